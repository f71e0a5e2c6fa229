"""Where the open-source ``ap_int`` / ``ap_fixed`` / ``hls_stream`` headers live.

The MoE kernels (``finn_flow/moe_ops/hls``) are written against these three header families
only, so g++ can compile and run them (C-simulation) without Vitis. The headers come from the
``hls4ml`` wheel (Apache-2.0, pinned in ``requirements/env.txt``, installed ``--no-deps``),
which ships them under ``hls4ml/templates/vivado/ap_types/``. The folder is found through
the installed distribution's file list; the package itself is never imported (importing it
would pull in its unlisted dependencies).
"""

from __future__ import annotations

import importlib.metadata as md
from pathlib import Path

#: path of the headers inside the hls4ml distribution
AP_TYPES = "hls4ml/templates/vivado/ap_types"
#: headers the kernels include (all must be present)
REQUIRED = ("ap_int.h", "ap_fixed.h", "hls_stream.h")
#: this folder: the kernels' own header(s)
KERNEL_DIR = Path(__file__).resolve().parent / "hls"


class HeadersNotFound(RuntimeError):
    """The ap_types headers are not installed (the message says how to install them)."""


def ap_types_dir() -> Path:
    """Folder holding ``ap_int.h`` / ``ap_fixed.h`` / ``hls_stream.h``.

    Raises:
        HeadersNotFound: hls4ml is not installed or its wheel lacks the headers.
    """
    try:
        dist = md.distribution("hls4ml")
    except md.PackageNotFoundError as err:
        raise HeadersNotFound(
            "the ap_int/hls_stream headers come from the hls4ml wheel, which is not installed: "
            "pip install --no-deps hls4ml==1.3.0 (pinned in requirements/env.txt)"
        ) from err
    files = [str(f) for f in dist.files or []]
    header = f"{AP_TYPES}/ap_int.h"
    if header not in files:
        raise HeadersNotFound(
            f"hls4ml {dist.version} does not ship {header}; the project pins hls4ml==1.3.0"
        )
    folder = Path(dist.locate_file(AP_TYPES))
    missing = [h for h in REQUIRED if not (folder / h).is_file()]
    if missing:
        raise HeadersNotFound(f"{folder} lacks {missing} (broken hls4ml install?)")
    return folder
