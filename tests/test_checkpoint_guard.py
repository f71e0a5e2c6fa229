"""CheckpointGuardHook: no checkpoint with NaN / inf tensors is ever written (and the
error names only a verified checkpoint); resuming is strict; after a resume exactly one
best checkpoint stays, the one an uninterrupted run keeps."""

from __future__ import annotations

import glob
import importlib.util
import os.path as osp
from types import ModuleType

import pytest
import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmseg.registry import HOOKS, METRICS

import mmseg_m3vit  # noqa: F401
from mmseg_m3vit.compat import CheckpointMismatchError, load_checkpoint_file
from mmseg_m3vit.engine import NonFiniteLossError
from mmseg_m3vit.engine.hooks import NonFiniteCheckpointError

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool(relpath: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tool = load_tool("tools/train.py", "m3vit_guard_train_tool")


@HOOKS.register_module(force=True)
class PoisonAfterUpdateHook(Hook):
    """Test helper: after the optimizer step of iteration ``at`` (1-based), before any
    checkpoint of that iteration, make one parameter (or its momentum) NaN: what a huge
    learning rate does while the loss of that step was still finite."""

    priority = "HIGH"

    def __init__(self, at: int, what: str = "param") -> None:
        self.at, self.what = at, what

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if runner.iter + 1 != self.at:
            return
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        p = model.backbone.blocks[1].moe.w1
        with torch.no_grad():
            if self.what == "param":
                p[0, 0, 0] = float("nan")
            else:
                runner.optim_wrapper.optimizer.state[p]["momentum_buffer"][0, 0, 0] = float("inf")


def _runner(config: str, work: str, extra_hooks: list[dict], **cfg_changes) -> Runner:
    cfg = train_tool.build_config(train_tool.parse_args([config, "--work-dir", work]))
    cfg.custom_hooks = [*cfg.custom_hooks, *extra_hooks]
    cfg.default_hooks.checkpoint.interval = 1
    for k, v in cfg_changes.items():
        cfg[k] = v
    cfg.experiment_name = f"guard_{osp.basename(work)}"
    return Runner.from_cfg(cfg)


@pytest.fixture(scope="module")
def config(tmp_path_factory, tiny_nyud_root: str, write_tiny_config) -> str:
    return write_tiny_config(str(tmp_path_factory.mktemp("cfg") / "tiny.py"), tiny_nyud_root)


@pytest.mark.parametrize("what", ["param", "momentum"])
def test_non_finite_state_is_never_saved(tmp_path, config: str, what: str) -> None:
    work = str(tmp_path / "work")
    runner = _runner(config, work, [dict(type="PoisonAfterUpdateHook", at=2, what=what)])
    with pytest.raises(NonFiniteCheckpointError) as err:
        runner.train()
    init_default_scope("mmseg")
    msg = str(err.value)
    assert "iteration 2" in msg and "No checkpoint was written" in msg
    if what == "param":
        assert "model 1 of" in msg and "backbone.blocks.1.moe.w1" in msg
    else:
        assert (
            "optimizer state 1 of" in msg and "momentum_buffer of backbone.blocks.1.moe.w1" in msg
        )
    # iteration 1 was saved and verified; iteration 2 was not written at all
    assert osp.isfile(osp.join(work, "iter_1.pth"))
    assert not glob.glob(osp.join(work, "iter_2.pth*"))
    with open(osp.join(work, "last_checkpoint")) as f:
        assert f.read().strip().endswith("iter_1.pth")
    assert f"the last verified checkpoint is {osp.join(work, 'iter_1.pth')}" in msg
    state = load_checkpoint_file(osp.join(work, "iter_1.pth"))["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_resuming_a_nan_checkpoint_fails_clearly(tmp_path, config: str) -> None:
    """A NaN file (as older code wrote) is refused on resume, and the loss error does not
    call it the last good checkpoint."""
    work = str(tmp_path / "work")
    _runner(config, work, [], train_cfg=dict(max_iters=1, val_interval=100)).train()
    init_default_scope("mmseg")
    ckpt = load_checkpoint_file(osp.join(work, "iter_1.pth"))
    ckpt["state_dict"]["backbone.cls_token"][0, 0, 0] = float("nan")
    bad = osp.join(work, "nan.pth")
    torch.save(ckpt, bad)
    with pytest.raises(NonFiniteCheckpointError, match="backbone.cls_token"):
        train_tool.main([config, "--work-dir", str(tmp_path / "w2"), "--resume", bad])
    init_default_scope("mmseg")
    # the loss error names last_checkpoint only after verifying it
    with open(osp.join(work, "last_checkpoint"), "w") as f:
        f.write(bad)
    runner = _runner(
        config,
        work,
        [dict(type="PoisonDepthHeadNaNHook")],
        train_cfg=dict(max_iters=3, val_interval=100),
    )
    with pytest.raises(NonFiniteLossError) as err:
        runner.train()
    init_default_scope("mmseg")
    assert "last good" not in str(err.value) and "is not finite" in str(err.value)
    assert f"last_checkpoint names {bad}" in str(err.value)


@HOOKS.register_module(force=True)
class PoisonDepthHeadNaNHook(Hook):
    """Test helper: the depth head outputs NaN from the first iteration on."""

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        model = runner.model.module if hasattr(runner.model, "module") else runner.model
        with torch.no_grad():
            for p in model.heads["depth"].parameters():
                p.fill_(float("nan"))


def test_resume_with_a_mismatched_config_fails(tmp_path, config: str) -> None:
    work = str(tmp_path / "work")
    _runner(config, work, [], train_cfg=dict(max_iters=1, val_interval=100)).train()
    init_default_scope("mmseg")
    with pytest.raises(CheckpointMismatchError) as err:
        train_tool.main(
            [config, "--work-dir", work, "--resume",
             "--cfg-options", "model.backbone.num_experts=8"]
        )  # fmt: skip
    init_default_scope("mmseg")
    msg = str(err.value)
    assert "cannot resume" in msg and "backbone.blocks.1.moe.w1" in msg and "(8, 32, 16)" in msg


# --------------------------------------------------------------------------- best
SCORES: list[float] = []


@METRICS.register_module(force=True)
class ScriptedScoreMetric(BaseMetric):
    """Test helper: the k-th evaluation scores ``SCORES[k]``."""

    def process(self, data_batch, data_samples) -> None:
        self.results.append(0)

    def compute_metrics(self, results: list) -> dict:
        return {"score": SCORES.pop(0)}


def _best_runner(config: str, work: str, max_iters: int, resume: bool) -> Runner:
    cfg = train_tool.build_config(train_tool.parse_args([config, "--work-dir", work]))
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=2)
    cfg.val_evaluator = dict(type="ScriptedScoreMetric")
    cfg.default_hooks.checkpoint = dict(
        type="CheckpointHook",
        by_epoch=False,
        interval=2,
        max_keep_ckpts=-1,
        save_best="score",
        rule="greater",
    )
    cfg.resume = resume
    cfg.experiment_name = f"best_{osp.basename(work)}_{max_iters}_{resume}"
    return Runner.from_cfg(cfg)


def _bests(work: str) -> list[str]:
    return sorted(osp.basename(p) for p in glob.glob(osp.join(work, "best_*.pth")))


@pytest.mark.slow
def test_one_best_checkpoint_after_resume(tmp_path, config: str) -> None:
    """Scores 1, 3, 2, 2.5 at iterations 2, 4, 6, 8: the best is iteration 4's. Resumed
    from iteration 4's checkpoint (written before iteration 4's validation), the run
    must adopt best_4 rather than keep tracking best_2's score."""
    scores, best = [1.0, 3.0, 2.0, 2.5], "best_score_iter_4.pth"
    # uninterrupted: 8 iterations, validation every 2
    SCORES[:] = scores
    straight = str(tmp_path / "straight")
    _best_runner(config, straight, 8, False).train()
    assert _bests(straight) == [best]
    # interrupted after iteration 4 (its checkpoint, then its validation), then resumed
    SCORES[:] = scores
    work = str(tmp_path / "resumed")
    _best_runner(config, work, 4, False).train()
    runner = _best_runner(config, work, 8, True)
    runner.train()
    init_default_scope("mmseg")
    assert _bests(work) == [best]
    assert runner.message_hub.get_info("best_score") == max(scores)
