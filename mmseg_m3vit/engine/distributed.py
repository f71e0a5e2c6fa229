"""Distributed data parallel that also runs on CPU (gloo), for tests and CPU clusters.

mmengine assumes a GPU in two places of its ``pytorch`` launcher path: ``init_dist``
calls ``torch.cuda.set_device`` (an AttributeError on CPU-only torch) and the runner
passes ``device_ids=[LOCAL_RANK]`` to ``DistributedDataParallel`` (rejected for CPU
modules). :func:`init_cpu_distributed` initialises the process group before the runner
does, and :class:`CPUAwareDistributedDataParallel` drops ``device_ids`` for CPU modules.
On GPUs both are no-ops and mmengine's own code path runs unchanged.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as torch_dist
from mmengine.model import MMDistributedDataParallel
from mmengine.optim import OptimWrapper
from mmengine.registry import MODEL_WRAPPERS

from ..models.losses import raise_label_errors


def init_cpu_distributed(launcher: str, backend: str = "gloo") -> bool:
    """Initialise a ``torchrun`` process group on a machine without CUDA.

    Args:
        launcher: the ``--launcher`` value of the tools; only ``'pytorch'`` (torchrun)
            is handled here, other launchers are left to mmengine.
        backend: process-group backend for CPU; ``'gloo'`` is the one that works.

    Returns:
        True when this call initialised the process group.

    Raises:
        RuntimeError: the torchrun environment variables are missing.
    """
    if launcher != "pytorch" or torch.cuda.is_available() or torch_dist.is_initialized():
        return False
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"--launcher pytorch needs the torchrun environment, but {missing} are not set; "
            "start the tool through tools/dist_train.sh or torchrun"
        )
    torch_dist.init_process_group(
        backend=backend,
        rank=int(os.environ["RANK"]),
        world_size=int(os.environ["WORLD_SIZE"]),
    )
    return True


@MODEL_WRAPPERS.register_module()
class CPUAwareDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` that accepts modules living on the CPU.

    The runner always passes ``device_ids=[LOCAL_RANK]``; for a CPU module that argument
    must be ``None``. ``train_step`` is mmengine's followed by the module's losses'
    label checks (as the segmentor's own ``train_step``, which DDP bypasses);
    ``val_step`` / ``test_step`` are mmengine's.
    """

    def __init__(
        self, module: torch.nn.Module, detect_anomalous_params: bool = False, **kwargs: Any
    ) -> None:
        first = next(module.parameters(), None)
        if first is not None and first.device.type == "cpu":
            kwargs["device_ids"] = None
            kwargs.pop("output_device", None)
        super().__init__(module=module, detect_anomalous_params=detect_anomalous_params, **kwargs)

    def train_step(
        self, data: dict | tuple | list, optim_wrapper: OptimWrapper
    ) -> dict[str, torch.Tensor]:
        """mmengine's DDP step, then :func:`raise_label_errors` on the wrapped module."""
        log_vars = super().train_step(data, optim_wrapper)
        raise_label_errors(self.module)
        return log_vars
