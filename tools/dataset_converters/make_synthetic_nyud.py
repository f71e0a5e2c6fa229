"""Render a synthetic NYUD-MT data set (ray-cast indoor scenes, all four tasks).

Usage::

    python tools/dataset_converters/make_synthetic_nyud.py --out data/synthetic_nyud \
        --num-train 300 --num-val 100 --size 240 320 --seed 0

Writes images/, segmentation/, depth/, normals/, edge/, gt_sets/{train,val}.txt and
meta.json (camera intrinsics, conventions) in the NYUD-MT layout read by
``NYUDMTDataset``. Same seed -> identical files (whatever ``--workers``). The renderer
lives in :mod:`mmseg_m3vit.datasets.synthetic_nyud`.
"""

from __future__ import annotations

import argparse
import os.path as osp
import sys

sys.path.insert(0, osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))

from mmseg_m3vit.datasets.synthetic_nyud import generate  # noqa: E402
from mmseg_m3vit.utils.cli import HelpFormatter  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line of the generator."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--num-train", type=int, default=300, help="training images")
    parser.add_argument("--num-val", type=int, default=100, help="validation images")
    parser.add_argument(
        "--size",
        type=int,
        nargs=2,
        default=(240, 320),
        metavar=("H", "W"),
        help="image size in pixels",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed")
    parser.add_argument("--workers", type=int, default=2, help="worker processes")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    seconds = generate(
        args.out,
        num_train=args.num_train,
        num_val=args.num_val,
        size=tuple(args.size),
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    n = args.num_train + args.num_val
    print(f"wrote {n} images of {args.size[0]}x{args.size[1]} to {args.out} in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
