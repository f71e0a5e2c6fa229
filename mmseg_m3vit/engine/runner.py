"""mmengine's runner with a console log a person reads.

``M3ViTRunner`` (RUNNERS; ``runner_type = 'M3ViTRunner'`` in the base runtime config) is
mmengine's ``Runner`` with three log records moved out of the way:

- the hook order table (about 90 lines) is logged at DEBUG instead of INFO;
- the system environment block and the full config text (several hundred lines) go to
  the log file only; the console gets one line naming the config file dumped in the work
  dir and the log file;
- mmengine's notes about its own deprecated ``FileClient`` / ``HardDiskBackend``, which its
  checkpoint hook triggers on every run, are dropped.

``log_level='DEBUG'`` in a config shows everything again.
"""

from __future__ import annotations

import logging
import os.path as osp
from typing import Any

from mmengine.logging import MMLogger
from mmengine.runner import Runner
from mmseg.registry import RUNNERS

#: Start of mmengine's hook order table.
HOOK_TABLE = "Hooks will be executed in the following order"
#: Start of mmengine's config dump.
CONFIG_DUMP = "Config:\n"
#: Start of mmengine's environment block (after a newline and a line of dashes).
ENV_BLOCK = "System environment:"
#: mmengine's notes on its own deprecated file backends.
MMENGINE_DEPRECATION_NOTES = (
    '"FileClient" will be deprecated in future',
    '"HardDiskBackend" is the alias of "LocalBackend"',
)


class QuietConsoleFilter(logging.Filter):
    """Handler filter: the hook table at DEBUG, the environment block and the config dump
    in files only, mmengine's deprecation notes nowhere.

    Args:
        handler: the handler this filter is attached to (its level decides whether a
            record moved to DEBUG is still shown).
    """

    def __init__(self, handler: logging.Handler) -> None:
        super().__init__()
        self.handler = handler
        self.console = not isinstance(handler, logging.FileHandler)

    def filter(self, record: logging.LogRecord) -> bool:
        """True when the record is shown by this handler."""
        message = str(record.msg)
        if message.startswith(MMENGINE_DEPRECATION_NOTES):
            return False
        if message.startswith(HOOK_TABLE):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return self.handler.level <= logging.DEBUG
        in_file_only = message.startswith(CONFIG_DUMP) or ENV_BLOCK in message[:100]
        if self.console and in_file_only:
            return self.handler.level <= logging.DEBUG
        return True


@RUNNERS.register_module()
class M3ViTRunner(Runner):
    """``Runner`` whose console log leaves out what nobody reads (see the module docstring)."""

    def build_logger(
        self, log_level: int | str = "INFO", log_file: str | None = None, **kwargs: Any
    ) -> MMLogger:
        """mmengine's logger, with a :class:`QuietConsoleFilter` on each handler."""
        logger = super().build_logger(log_level=log_level, log_file=log_file, **kwargs)
        for handler in logger.handlers:
            if not any(isinstance(f, QuietConsoleFilter) for f in handler.filters):
                handler.addFilter(QuietConsoleFilter(handler))
        return logger

    def dump_config(self) -> None:
        """Dump the config to the work dir and name the file on the console."""
        super().dump_config()
        name = osp.basename(self.cfg.filename) if self.cfg.filename else f"{self.timestamp}.py"
        self.logger.info(
            f"config: {osp.join(self.work_dir, name)} (config text and environment in "
            f"{self.logger.log_file})"
        )
