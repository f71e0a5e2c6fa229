"""Vivado-free start-up of finn-plus, in one place.

finn-plus expects to be started by its ``finn`` command-line tool, which needs Vivado and
the network. For estimate and code-generation builds none of that is needed; what is
needed is done by :func:`start_finn` before anything imports ``finn.builder``:

1. FINN's settings are created with ``finn.util.settings.initialize_dummy_settings()``,
   with ``FINN_SETTINGS`` and ``FINN_BUILD_DIR`` pointing inside the build's own output
   folder, so nothing is written to ``~/.finn`` or to a shared temporary folder.
2. ``finn.xsi.SimEngine`` is set to ``None``: finn-plus looks up the Vivado simulator
   eagerly, and a plain attribute shadows the lazy loader.
3. ``XILINX_VIVADO`` is given a placeholder when unset (FINN's report step reads it for
   metadata only); :attr:`FinnEnv.vivado_present` records whether a real one was there so
   that build summaries can say so.

Calling :func:`start_finn` again with another folder re-points the settings there (the
settings are process-global, so builds in one process run one after another).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

#: Value given to ``XILINX_VIVADO`` when it is unset. It names no real installation.
VIVADO_PLACEHOLDER = "/nonexistent/Xilinx/Vivado/2024.2-not-installed"

#: Vivado release the later steps (HLS synthesis, IP stitching, bitfile) are written for.
REQUIRED_VIVADO = "2024.2"


@dataclass(frozen=True)
class FinnEnv:
    """What :func:`start_finn` set up.

    Attributes:
        root: folder holding FINN's settings file and build folder (absolute).
        settings_file: value of ``FINN_SETTINGS`` (the file need not exist).
        build_dir: value of ``FINN_BUILD_DIR`` (FINN's scratch space for generated code).
        finn_version: installed ``finn-plus`` version.
        vivado_present: whether ``XILINX_VIVADO`` was set by the user (not our placeholder).
        xilinx_vivado: the value ``XILINX_VIVADO`` has now (possibly the placeholder).
    """

    root: str
    settings_file: str
    build_dir: str
    finn_version: str
    vivado_present: bool
    xilinx_vivado: str

    def as_dict(self) -> dict[str, str | bool]:
        """Return the fields as a JSON-serialisable dict (for build summaries)."""
        return asdict(self)


def finn_version() -> str:
    """Return the installed finn-plus version.

    Raises:
        ImportError: finn-plus is not installed, with the command that installs it.
    """
    try:
        return version("finn-plus")
    except PackageNotFoundError:
        raise ImportError(
            "finn-plus is not installed in this environment; run tools/setup_env.sh "
            "(it installs finn-plus==1.6.1 with --no-deps plus its listed requirements)"
        ) from None


def start_finn(root: str | os.PathLike[str]) -> FinnEnv:
    """Start finn-plus without Vivado, keeping its settings and build files under ``root``.

    Args:
        root: a folder (created if missing) that will hold ``finn_settings.yaml`` (not
            written unless FINN saves settings) and ``finn_build/`` (FINN_BUILD_DIR).

    Returns:
        A :class:`FinnEnv` describing the start-up, for the build summary.

    Raises:
        PermissionError: ``root`` cannot be created or is not writable.
        ImportError: finn-plus is missing.
    """
    root_path = Path(root).expanduser().resolve()
    try:
        build_dir = root_path / "finn_build"
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PermissionError(
            f"cannot create FINN's build folder under {root_path}: {err}"
        ) from err
    if not os.access(build_dir, os.W_OK):
        raise PermissionError(f"FINN's build folder {build_dir} is not writable")
    fversion = finn_version()

    settings_file = root_path / "finn_settings.yaml"
    os.environ["FINN_SETTINGS"] = str(settings_file)
    os.environ["FINN_BUILD_DIR"] = str(build_dir)
    vivado = os.environ.get("XILINX_VIVADO")
    vivado_present = bool(vivado) and vivado != VIVADO_PLACEHOLDER
    if not vivado_present:
        os.environ["XILINX_VIVADO"] = VIVADO_PLACEHOLDER

    import finn.util.settings as finn_settings

    finn_settings.initialize_dummy_settings()
    resolved = Path(finn_settings.get_settings().finn_build_dir)
    if resolved != build_dir:
        raise RuntimeError(
            f"finn-plus resolved FINN_BUILD_DIR to {resolved}, expected {build_dir}; "
            "the settings start-up of this finn-plus version differs from 1.6.1"
        )

    import finn.xsi

    finn.xsi.SimEngine = None  # shadows the lazy loader that would look for Vivado's xsim

    return FinnEnv(
        root=str(root_path),
        settings_file=str(settings_file),
        build_dir=str(build_dir),
        finn_version=fversion,
        vivado_present=vivado_present,
        xilinx_vivado=os.environ["XILINX_VIVADO"],
    )
