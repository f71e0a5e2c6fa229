"""Package version and the one source of truth for the supported OpenMMLab range.

:func:`check_versions` runs when ``mmseg_m3vit`` is imported. The tested pins are in
``requirements/env.txt``; the ranges below are what the code supports.
"""

from __future__ import annotations

__version__ = "0.1.0"

#: package -> (minimum inclusive, maximum exclusive), as version strings.
SUPPORTED: dict[str, tuple[str, str]] = {
    "mmcv": ("2.0.0", "2.2.0"),
    "mmengine": ("0.10.0", "0.11.0"),
    "mmseg": ("1.2.0", "1.3.0"),
}

_PIP_NAMES = {"mmcv": "mmcv-lite", "mmengine": "mmengine", "mmseg": "mmsegmentation"}


def _parse(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():  # e.g. '0rc1': stop at the pre-release marker
            break
    return tuple(parts)


def version_error(package: str, found: str) -> str | None:
    """Return an actionable message when ``found`` is outside ``SUPPORTED[package]``.

    Args:
        package: import name (``'mmcv'``, ``'mmengine'`` or ``'mmseg'``).
        found: the installed version string.

    Returns:
        None when supported, else a message saying what is installed, what is
        supported and the command that installs the tested version.
    """
    low, high = SUPPORTED[package]
    if _parse(low) <= _parse(found) < _parse(high):
        return None
    return (
        f"mmseg-m3vit supports {package}>={low},<{high}, but {package} {found} is installed. "
        f"Run `bash tools/setup_env.sh` for the tested environment, or "
        f"`pip install '{_PIP_NAMES[package]}>={low},<{high}'`."
    )


def check_versions() -> None:
    """Raise ImportError with an actionable message if the stack is out of range."""
    import mmcv
    import mmengine
    import mmseg

    errors = [
        msg
        for msg in (
            version_error("mmcv", mmcv.__version__),
            version_error("mmengine", mmengine.__version__),
            version_error("mmseg", mmseg.__version__),
        )
        if msg
    ]
    if errors:
        raise ImportError("\n".join(errors))
