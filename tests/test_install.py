"""The installed stack: imports, version guards, the mmcv.ops fallback, resuming."""

from __future__ import annotations

import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mmseg_m3vit
from mmseg_m3vit.version import SUPPORTED, check_versions, version_error


def test_packages_import_and_register():
    import mmcv.ops
    import mmseg.models  # fails with "No module named 'mmcv._ext'" without the fallback

    import finn_flow  # noqa: F401

    assert mmseg_m3vit.__version__
    assert hasattr(mmcv.ops, "point_sample")
    assert mmseg.models.SegDataPreProcessor is not None


@pytest.mark.parametrize(
    "package,found,ok",
    [
        ("mmcv", "2.1.0", True),
        ("mmcv", "2.2.0", False),
        ("mmcv", "1.7.2", False),
        ("mmengine", "0.10.7", True),
        ("mmengine", "1.0.0rc0", False),
        ("mmseg", "1.2.2", True),
        ("mmseg", "0.30.0", False),
    ],
)
def test_version_error_message(package: str, found: str, ok: bool):
    msg = version_error(package, found)
    if ok:
        assert msg is None
        return
    low, high = SUPPORTED[package]
    assert found in msg and f">={low},<{high}" in msg
    assert "tools/setup_env.sh" in msg and "pip install" in msg


def test_check_versions_raises_on_faked_bad_version(monkeypatch):
    import mmcv

    monkeypatch.setattr(mmcv, "__version__", "2.2.0")
    with pytest.raises(ImportError, match=r"mmcv 2\.2\.0 is installed"):
        check_versions()


def _bilinear_reference(img: np.ndarray, x: float, y: float) -> np.ndarray:
    """Bilinear sample of img (C,H,W) at pixel coords (x, y), zero outside, float64."""
    c, h, w = img.shape
    x0, y0 = int(np.floor(x)), int(np.floor(y))
    out = np.zeros(c)
    for yy, wy in ((y0, y0 + 1 - y), (y0 + 1, y - y0)):
        for xx, wx in ((x0, x0 + 1 - x), (x0 + 1, x - x0)):
            if 0 <= yy < h and 0 <= xx < w:
                out += wy * wx * img[:, yy, xx]
    return out


def test_point_sample_fallback_matches_grid_sample():
    from mmcv.ops import point_sample

    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 5, 7, 9, generator=gen, dtype=torch.float64)
    points = torch.rand(2, 11, 2, generator=gen, dtype=torch.float64) * 1.2 - 0.1
    out = point_sample(feats, points, align_corners=False)
    ref = F.grid_sample(
        feats, (2 * points - 1).unsqueeze(2), align_corners=False, padding_mode="zeros"
    ).squeeze(3)
    assert out.shape == (2, 5, 11)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
    # and an independent hand-written bilinear sample (align_corners=False convention)
    n, p = 1, 3
    px = points[n, p, 0].item() * 9 - 0.5
    py = points[n, p, 1].item() * 7 - 0.5
    np.testing.assert_allclose(out[n, :, p].numpy(), _bilinear_reference(feats[n].numpy(), px, py))


def test_fallback_unknown_op_and_focal_loss_errors():
    import mmcv.ops

    with pytest.raises(ModuleNotFoundError, match="compiled ops"):
        mmcv.ops.RoIAlign  # noqa: B018
    with pytest.raises(RuntimeError, match="mmcv-lite"):
        mmcv.ops.sigmoid_focal_loss(torch.zeros(1), torch.zeros(1))


def test_fallback_steps_aside_for_real_ops():
    # Load the shim by path so the package __init__ (which imports mmseg) does not run
    # against the fake module.
    import mmseg_m3vit.compat.mmcv_ops as shim

    code = (
        "import importlib.util, sys, types\n"
        "real = types.ModuleType('mmcv.ops')\n"
        "real.point_sample = 'compiled'\n"
        "sys.modules['mmcv.ops'] = real\n"
        f"spec = importlib.util.spec_from_file_location('shim', {shim.__file__!r})\n"
        "shim = importlib.util.module_from_spec(spec); spec.loader.exec_module(shim)\n"
        "assert shim.install() is False\n"
        "assert sys.modules['mmcv.ops'] is real\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def _tiny_runner(work_dir, max_iters: int, resume: bool = False):
    from mmengine.model import BaseModel
    from mmengine.runner import Runner

    class TinyRegressor(BaseModel):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 1)

        def forward(self, inputs, targets=None, mode="tensor"):
            out = self.linear(inputs)
            if mode == "loss":
                return {"loss": ((out.squeeze(1) - targets) ** 2).mean()}
            return out

    torch.manual_seed(0)  # the model is built here, before the Runner seeds
    model = TinyRegressor()
    gen = torch.Generator().manual_seed(0)
    data = [
        dict(inputs=torch.randn(3, generator=gen), targets=torch.randn((), generator=gen))
        for _ in range(8)
    ]
    return Runner(
        model=model,
        work_dir=str(work_dir),
        train_dataloader=dict(
            dataset=data,
            sampler=dict(type="DefaultSampler", shuffle=False),
            collate_fn=dict(type="default_collate"),
            batch_size=2,
        ),
        optim_wrapper=dict(optimizer=dict(type="SGD", lr=0.1, momentum=0.9)),
        train_cfg=dict(by_epoch=False, max_iters=max_iters, val_interval=1000),
        default_hooks=dict(checkpoint=dict(type="CheckpointHook", interval=2, by_epoch=False)),
        resume=resume,
        randomness=dict(seed=0),
        default_scope="mmseg",  # the current scope outlives the test: keep it mmseg's
        log_level="WARNING",
        experiment_name=f"tiny_{max_iters}_{resume}",
    )


def test_runner_checkpoint_resumes_under_weights_only_default(tmp_path):
    first = _tiny_runner(tmp_path, max_iters=2)
    first.train()
    ckpt = tmp_path / "iter_2.pth"
    assert ckpt.is_file()
    # The file really holds non-tensor objects that torch's default loader refuses.
    with pytest.raises(pickle.UnpicklingError):
        torch.load(ckpt, weights_only=True)

    saved = torch.load(ckpt, weights_only=False)
    resumed = _tiny_runner(tmp_path, max_iters=4, resume=True)
    resumed.train()
    assert resumed.iter == 4
    # The resumed run started from the saved weights and momentum, so it equals an
    # uninterrupted 4-iteration run.
    straight = _tiny_runner(tmp_path / "straight", max_iters=4)
    straight.train()
    for key, value in straight.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value)
    assert saved["meta"]["iter"] == 2
