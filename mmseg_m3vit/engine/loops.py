"""bf16 on GPUs: the evaluation loop of ``tools/test.py --amp`` and the optimiser-wrapper
settings of ``tools/train.py --amp``.

mmengine's ``TestLoop(fp16=True)`` autocasts to float16 only; M3ViT is run in bfloat16 on
GPUs (same exponent range as float32, no loss of dynamic range in the router softmax).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from mmengine.runner import TestLoop
from mmengine.runner.amp import autocast
from mmseg.registry import LOOPS

#: ``AmpOptimWrapper`` arguments of bf16 training: no loss scaling, which bf16 (float32's
#: exponent range) does not need; mmengine's default dynamic GradScaler would also read an
#: inf flag back to the host every step, stalling the launch queue. Copy before editing.
BF16_OPTIM_WRAPPER = dict(type="AmpOptimWrapper", dtype="bfloat16", loss_scale=dict(enabled=False))


@LOOPS.register_module()
class AmpTestLoop(TestLoop):
    """``TestLoop`` whose forward passes run under ``torch.autocast(dtype=dtype)``.

    Args:
        runner, dataloader, evaluator: as for mmengine's ``TestLoop``.
        dtype: autocast dtype name, ``'bfloat16'`` (default) or ``'float16'``.
    """

    def __init__(self, runner, dataloader, evaluator, dtype: str = "bfloat16") -> None:
        if dtype not in ("bfloat16", "float16"):
            raise ValueError(f"AmpTestLoop dtype must be 'bfloat16' or 'float16', got {dtype!r}")
        super().__init__(runner, dataloader, evaluator, fp16=False)
        self.dtype = getattr(torch, dtype)

    @torch.no_grad()
    def run_iter(self, idx: int, data_batch: Sequence[dict]) -> None:
        """Predict one batch under autocast and feed the evaluator (no test losses)."""
        self.runner.call_hook("before_test_iter", batch_idx=idx, data_batch=data_batch)
        with autocast(dtype=self.dtype):
            outputs = self.runner.model.test_step(data_batch)
        self.evaluator.process(data_samples=outputs, data_batch=data_batch)
        self.runner.call_hook(
            "after_test_iter", batch_idx=idx, data_batch=data_batch, outputs=outputs
        )
