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


def test_resume_with_another_task_order_fails(tmp_path, config: str) -> None:
    """Weights load by task name, but SGD's momentum for the router rows is stored per
    position: resuming with the tasks reordered must fail, not mix momentum rows."""
    work = str(tmp_path / "work")
    _runner(config, work, [], train_cfg=dict(max_iters=1, val_interval=100)).train()
    init_default_scope("mmseg")
    with pytest.raises(CheckpointMismatchError, match="another order.*optimizer state"):
        train_tool.main(
            [config, "--work-dir", work, "--resume",
             "--cfg-options", "model.tasks=[edge,normals,semseg,depth]"]
        )  # fmt: skip
    init_default_scope("mmseg")


# --------------------------------------------------------------------------- best
SCORES: list[float] = []


@METRICS.register_module(force=True)
class ScriptedScoreMetric(BaseMetric):
    """Test helper: the k-th evaluation scores ``SCORES[k]``."""

    def process(self, data_batch, data_samples) -> None:
        self.results.append(0)

    def compute_metrics(self, results: list) -> dict:
        return {"score": SCORES.pop(0)}


@HOOKS.register_module(force=True)
class KillAtIterHook(Hook):
    """Test helper: the process dies at the start of iteration ``at`` (1-based); no
    after-train hook runs."""

    def __init__(self, at: int) -> None:
        self.at = at

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter + 1 == self.at:
            raise KeyboardInterrupt(f"killed at iteration {self.at}")


def _best_run(config: str, work: str, scores: list[float], kill_at: int | None) -> Runner:
    """Train to iteration 6 (validation every iteration, a checkpoint every 2), resuming
    when the work dir has a checkpoint; dies at ``kill_at``."""
    SCORES[:] = scores
    cfg = train_tool.build_config(train_tool.parse_args([config, "--work-dir", work]))
    cfg.train_cfg = dict(type="IterBasedTrainLoop", max_iters=6, val_interval=1)
    cfg.val_evaluator = dict(type="ScriptedScoreMetric")
    cfg.default_hooks.checkpoint = dict(
        type="CheckpointHook", by_epoch=False, interval=2, max_keep_ckpts=-1,
        save_best="score", rule="greater",
    )  # fmt: skip
    if kill_at is not None:
        cfg.custom_hooks = [*cfg.custom_hooks, dict(type="KillAtIterHook", at=kill_at)]
    cfg.resume = osp.isfile(osp.join(work, "last_checkpoint"))
    cfg.experiment_name = f"best_{osp.basename(work)}_{len(glob.glob(work + '/*.pth'))}"
    runner = Runner.from_cfg(cfg)
    try:
        runner.train()
    except KeyboardInterrupt:
        pass
    init_default_scope("mmseg")
    return runner


def _bests(work: str) -> list[str]:
    return sorted(osp.basename(p) for p in glob.glob(osp.join(work, "best_*.pth")))


@pytest.mark.slow
def test_one_best_checkpoint_after_resume(tmp_path, config: str) -> None:
    """mmengine re-saves the latest checkpoint after a new best, but not in a resumed
    run before its first interval checkpoint. Here run 1 dies at iteration 3 (iter_2
    holds best_2); run 2 resumes from iter_2, finds a new best at iteration 3 and dies
    before iteration 4's checkpoint; run 3 resumes from iter_2 again and (training is
    not bit-reproducible on every device) scores iteration 3 lower. An uninterrupted run
    with run 3's scores keeps only best_score_iter_4; mmengine alone also keeps run 2's
    best_score_iter_3, which belongs to a timeline that no longer exists."""
    straight = str(tmp_path / "straight")
    _best_run(config, straight, [1.0, 2.0, 1.5, 2.6, 2.4, 2.5], None)
    assert _bests(straight) == ["best_score_iter_4.pth"]

    work = str(tmp_path / "resumed")
    _best_run(config, work, [1.0, 2.0], kill_at=3)
    assert _bests(work) == ["best_score_iter_2.pth"]
    _best_run(config, work, [3.0], kill_at=4)
    assert _bests(work) == ["best_score_iter_3.pth"]
    runner = _best_run(config, work, [1.5, 2.6, 2.4, 2.5], None)
    assert _bests(work) == ["best_score_iter_4.pth"]
    assert runner.message_hub.get_info("best_score") == 2.6


@pytest.mark.slow
def test_best_saved_after_the_resumed_checkpoint_is_adopted(tmp_path, config: str) -> None:
    """Run 2 of the scenario above dies after iteration 3's best, and the run resumes
    from a checkpoint of iteration 3 whose message hub predates that best (as when the
    process dies between the best and mmengine's re-save): the best of iteration 3 is
    adopted with its score, so a lower later score does not replace it."""
    work = str(tmp_path / "w")
    _best_run(config, work, [1.0, 2.0], kill_at=3)
    _best_run(config, work, [3.0], kill_at=4)
    # a checkpoint of iteration 3 from before its validation: iter_2's state, iter 3
    ckpt = load_checkpoint_file(osp.join(work, "iter_2.pth"))
    ckpt["meta"]["iter"] = 3
    torch.save(ckpt, osp.join(work, "iter_3.pth"))
    with open(osp.join(work, "last_checkpoint"), "w") as f:
        f.write(osp.join(work, "iter_3.pth"))
    runner = _best_run(config, work, [2.5, 2.4, 2.3], None)
    assert _bests(work) == ["best_score_iter_3.pth"]
    assert runner.message_hub.get_info("best_score") == 3.0
