"""In-memory synthetic NYUD samples for throughput runs (no files, no decoding).

Registers ``SyntheticNYUDDataset`` in mmseg's DATASETS. Every item is already in the
form ``PackMultiTaskInputs`` produces (``inputs`` uint8 (3, H, W), ``data_samples`` a
``SegDataSample`` with every task's ground truth), drawn once from a small pool of
random samples, so the data loader costs next to nothing and a run measures the model.
Imported through ``custom_imports`` with ``tools/gpu`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import importlib.util
import pathlib

from mmseg.registry import DATASETS
from torch.utils.data import Dataset


def _load_benchmark():
    path = pathlib.Path(__file__).parents[1] / "analysis_tools" / "benchmark.py"
    spec = importlib.util.spec_from_file_location("m3vit_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    import sys

    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@DATASETS.register_module()
class SyntheticNYUDDataset(Dataset):
    """``length`` items cycling over ``pool`` random NYUD-like samples of ``size`` (H, W).

    Tasks: semseg (40 classes), depth, normals, edge (see ``benchmark.synthetic_batch``).
    """

    def __init__(
        self,
        length: int = 10000,
        pool: int = 16,
        size: tuple[int, int] = (480, 640),
        tasks: tuple[str, ...] = ("semseg", "depth", "normals", "edge"),
        seed: int = 0,
    ) -> None:
        batch = _load_benchmark().synthetic_batch(pool, tuple(size), list(tasks), seed)
        self.items = list(zip(batch["inputs"], batch["data_samples"]))
        self.length = length
        self.metainfo = {"tasks": list(tasks)}

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> dict:
        inputs, sample = self.items[idx % len(self.items)]
        return {"inputs": inputs, "data_samples": sample.clone()}
