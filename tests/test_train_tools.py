"""tools/train.py, tools/test.py, the routing tool and the engine hooks, end to end on a
tiny config and a tiny synthetic NYUD-MT set (32x48 images).

Covers: resume after SIGKILL equals an uninterrupted run; a NaN loss stops training with
a message naming the task and iteration and keeps the last good checkpoint; unknown task
names (config or --task) fail listing the valid tasks; a missing data root fails before
any model is built; --task evaluates only the chosen tasks; routing fractions sum to k.
"""

from __future__ import annotations

import glob
import importlib.util
import os
import os.path as osp
import pickle
import signal
import subprocess
import sys
import textwrap
from types import ModuleType

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.runner import Runner
from mmseg.registry import HOOKS, MODELS

import mmseg_m3vit  # noqa: F401  (registers the plugin)
from mmseg_m3vit.compat import CheckpointMismatchError, load_checkpoint_file
from mmseg_m3vit.engine import NonFiniteLossError

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool(relpath: str, name: str) -> ModuleType:
    """Import a script under tools/ by path (``test`` would clash with the stdlib)."""
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_tool = load_tool("tools/train.py", "m3vit_tools_train")
test_tool = load_tool("tools/test.py", "m3vit_tools_test")
routing_tool = load_tool("tools/analysis_tools/routing.py", "m3vit_tools_routing")


NYUD_TASKS = ["semseg", "depth", "normals", "edge"]
MAX_ITERS = 6


@pytest.fixture(scope="module")
def data_root(tiny_nyud_root: str) -> str:
    return tiny_nyud_root


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory, data_root: str, write_tiny_config) -> str:
    return write_tiny_config(str(tmp_path_factory.mktemp("cfg") / "tiny.py"), data_root)


def run_train(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """Run tools/train.py in a fresh process (as a user would)."""
    return subprocess.run(
        [sys.executable, osp.join(ROOT, "tools", "train.py"), *args],
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, config: str) -> str:
    """Work dir of one uninterrupted MAX_ITERS-iteration run."""
    work = str(tmp_path_factory.mktemp("uninterrupted"))
    proc = run_train([config, "--work-dir", work])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


def load_state(path: str) -> dict[str, torch.Tensor]:
    return load_checkpoint_file(path)["state_dict"]  # the safe loader reads our own files


def test_resume_after_kill_equals_uninterrupted(tmp_path: str, config: str, trained: str) -> None:
    # A hook module that SIGKILLs the process at the start of iteration 4 (after the
    # checkpoint of iteration 2 and the update of iteration 3): no clean-up runs.
    (tmp_path / "kill_hook_m3vit_test.py").write_text(
        textwrap.dedent(
            """
            import os, signal
            from mmengine.hooks import Hook
            from mmseg.registry import HOOKS

            @HOOKS.register_module()
            class KillAtIterHook(Hook):
                def before_train_iter(self, runner, batch_idx, data_batch=None):
                    if runner.iter == 3:
                        os.kill(os.getpid(), signal.SIGKILL)
            """
        )
    )
    killed_cfg = str(tmp_path / "killed.py")
    with open(killed_cfg, "w") as f:
        f.write(
            f"_base_ = [{config!r}]\n"
            "custom_imports = dict(imports=['mmseg_m3vit', 'kill_hook_m3vit_test'], "
            "allow_failed_imports=False)\n"
            "custom_hooks = [dict(type='NonFiniteLossHook'), dict(type='KillAtIterHook')]\n"
        )
    work = str(tmp_path / "work")
    env = {"PYTHONPATH": str(tmp_path)}
    proc = run_train([killed_cfg, "--work-dir", work], env)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stderr[-2000:])
    assert osp.isfile(osp.join(work, "iter_2.pth"))
    assert not osp.isfile(osp.join(work, f"iter_{MAX_ITERS}.pth"))

    proc = run_train([config, "--work-dir", work, "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Advance dataloader 2 steps" in proc.stdout + proc.stderr

    resumed = load_state(osp.join(work, f"iter_{MAX_ITERS}.pth"))
    reference = load_state(osp.join(trained, f"iter_{MAX_ITERS}.pth"))
    assert resumed.keys() == reference.keys()
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-6, msg=key)
    # and training did change the weights (the comparison is not between two inits)
    first = load_state(osp.join(trained, "iter_2.pth"))
    assert any(not torch.equal(first[k], reference[k]) for k in reference)


@HOOKS.register_module(force=True)
class PoisonDepthHeadHook(Hook):
    """Test helper: makes the depth head output NaN from iteration ``at`` (1-based)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        if runner.iter + 1 == self.at:
            model = runner.model.module if hasattr(runner.model, "module") else runner.model
            with torch.no_grad():
                for p in model.heads["depth"].parameters():
                    p.fill_(float("nan"))


def test_nan_loss_stops_naming_task_and_iteration(tmp_path, config: str) -> None:
    work = str(tmp_path / "work")
    args = train_tool.parse_args([config, "--work-dir", work])
    cfg = train_tool.build_config(args)
    cfg.custom_hooks = [*cfg.custom_hooks, dict(type="PoisonDepthHeadHook", at=3)]
    cfg.experiment_name = "nan_test"
    runner = Runner.from_cfg(cfg)
    with pytest.raises(NonFiniteLossError) as err:
        runner.train()
    msg = str(err.value)
    assert "iteration 3" in msg and "task 'depth'" in msg and "depth.loss_depth" in msg
    # checkpoint of iteration 2 kept and still finite; iteration 3 never saved
    assert osp.isfile(osp.join(work, "iter_2.pth"))
    assert not glob.glob(osp.join(work, "iter_3.pth"))
    with open(osp.join(work, "last_checkpoint")) as f:
        assert f.read().strip().endswith("iter_2.pth")
    assert "iter_2.pth" in msg
    state = load_state(osp.join(work, "iter_2.pth"))
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_amp_is_bfloat16_without_loss_scaling_unless_the_config_sets_it(config: str) -> None:
    cfg = train_tool.build_config(train_tool.parse_args([config, "--amp"]))
    wrapper = cfg.optim_wrapper
    assert (wrapper.type, wrapper.dtype) == ("AmpOptimWrapper", "bfloat16")
    assert wrapper.loss_scale == {"enabled": False}
    args = train_tool.parse_args(
        [config, "--amp", "--cfg-options", "optim_wrapper.loss_scale=512.0"]
    )
    assert train_tool.build_config(args).optim_wrapper.loss_scale == 512.0


def test_unknown_task_in_config_lists_valid_tasks(config: str) -> None:
    args = train_tool.parse_args(
        [config, "--cfg-options", "train_dataloader.dataset.tasks=[semseg,dpeth]"]
    )
    with pytest.raises(ValueError) as err:
        train_tool.build_config(args)
    msg = str(err.value)
    assert "dpeth" in msg and "train_dataloader.dataset.tasks" in msg
    assert "valid tasks" in msg and "'normals'" in msg


def test_unknown_head_task_in_config(tmp_path, config: str) -> None:
    cfg_path = str(tmp_path / "bad_head.py")
    with open(cfg_path, "w") as f:
        f.write(
            f"_base_ = [{config!r}]\n"
            "model = dict(decode_heads=dict(segsem=dict(type='PUPHead', num_classes=40, "
            "loss_decode=dict(type='PixelCrossEntropyLoss'))))\n"
        )
    with pytest.raises(ValueError, match=r"segsem.*valid tasks"):
        train_tool.build_config(train_tool.parse_args([cfg_path]))


def test_unknown_task_on_test_command_line(tmp_path, config: str) -> None:
    ckpt = tmp_path / "fake.pth"
    ckpt.write_bytes(b"")
    with pytest.raises(ValueError) as err:
        test_tool.build_config(test_tool.parse_args([config, str(ckpt), "--task", "dpeth"]))
    assert "dpeth" in str(err.value)
    assert str(NYUD_TASKS) in str(err.value)


def test_missing_data_root_fails_before_model_is_built(
    tmp_path, config, monkeypatch, capsys
) -> None:
    def no_build(*args, **kwargs):
        raise AssertionError("a model or runner was built before the data root was checked")

    monkeypatch.setattr(Runner, "from_cfg", no_build)
    monkeypatch.setattr(MODELS, "build", no_build)
    missing = str(tmp_path / "no_such_dir")
    with pytest.raises(SystemExit) as err:
        train_tool.main(
            [config, "--work-dir", str(tmp_path / "w"), "--cfg-options",
             f"train_dataloader.dataset.data_root={missing}"]
        )  # fmt: skip
    # one line on stderr, exit status 2, no traceback (as argparse does for a bad flag)
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert msg.startswith("train.py: error: ") and "Traceback" not in msg
    assert missing in msg and "train_dataloader.dataset.data_root" in msg


def test_test_tool_single_task_pathway(tmp_path, config: str, trained: str, capsys) -> None:
    ckpt = osp.join(trained, f"iter_{MAX_ITERS}.pth")
    out = str(tmp_path / "preds.pkl")
    show = str(tmp_path / "show")
    metrics = test_tool.main(
        [config, ckpt, "--task", "depth", "--work-dir", str(tmp_path / "w"),
         "--out", out, "--show-dir", show]
    )  # fmt: skip
    tasks_scored = {k.split("/")[0] for k in metrics}
    assert tasks_scored == {"depth", "multitask"}, metrics
    assert {"multitask/delta_m", "multitask/delta_depth"} <= set(metrics)
    assert metrics["multitask/delta_m"] == pytest.approx(metrics["multitask/delta_depth"])
    with open(out, "rb") as f:
        dumped = pickle.load(f)
    assert len(dumped) == 4  # the 4 val images
    assert "pred_depth_map" in dumped[0] and "pred_sem_seg" not in dumped[0]
    assert len(glob.glob(osp.join(show, "*.png"))) == 4
    out = capsys.readouterr().out
    assert "] 4/4," in out and "ETA" in out  # the progress bar over the 4 test images
    assert "Hooks will be executed" not in out and "FileClient" not in out

    # the single-task pathway gives the same depth as the all-task run
    all_metrics = test_tool.main([config, ckpt, "--work-dir", str(tmp_path / "w2")])
    assert set(all_metrics) > set(metrics)
    assert all_metrics["depth/rmse"] == pytest.approx(metrics["depth/rmse"], rel=1e-5)

    # --amp: the same pathway under bfloat16 autocast lands near the float32 result
    amp_metrics = test_tool.main(
        [config, ckpt, "--task", "depth", "--amp", "--work-dir", str(tmp_path / "w3")]
    )
    assert amp_metrics["depth/rmse"] == pytest.approx(metrics["depth/rmse"], rel=0.05)


def test_test_tool_loads_strictly(tmp_path, config: str, trained: str) -> None:
    """A checkpoint of another model size fails naming the keys instead of leaving the MoE
    layers random and reporting metrics; so does the routing tool."""
    ckpt = osp.join(trained, f"iter_{MAX_ITERS}.pth")
    args = [config, ckpt, "--work-dir", str(tmp_path / "w"),
            "--cfg-options", "model.backbone.num_experts=8"]  # fmt: skip
    with pytest.raises(CheckpointMismatchError) as err:
        test_tool.main(args)
    msg = str(err.value)
    assert ckpt in msg and "backbone.blocks.1.moe.w1 (4, 32, 16) (model: (8, 32, 16))" in msg
    with pytest.raises(CheckpointMismatchError):
        routing_tool.main([config, ckpt, "--cfg-options", "model.backbone.num_experts=8"])


def test_test_tool_with_reordered_tasks_gives_the_same_metrics(
    tmp_path, config: str, trained: str
) -> None:
    """Listing the tasks (hence the heads and router rows) in another order must not
    hand each task another task's router: every metric equals the one of the original
    order."""
    ckpt = osp.join(trained, f"iter_{MAX_ITERS}.pth")
    original = test_tool.main([config, ckpt, "--work-dir", str(tmp_path / "a")])
    reordered = ["--cfg-options", "model.tasks=[edge,normals,semseg,depth]"]
    args = test_tool.parse_args([config, ckpt, "--work-dir", str(tmp_path / "b"), *reordered])
    assert list(test_tool.build_config(args).model.tasks) == ["edge", "normals", "semseg", "depth"]
    got = test_tool.main([config, ckpt, "--work-dir", str(tmp_path / "b"), *reordered])
    assert got == pytest.approx(original, rel=1e-6, abs=1e-9)


def test_routing_tool_fractions(tmp_path, config: str, trained: str, capsys) -> None:
    ckpt = osp.join(trained, f"iter_{MAX_ITERS}.pth")
    png = str(tmp_path / "routing.png")
    load = routing_tool.main([config, ckpt, "--task", "semseg", "edge", "--out", png])
    assert set(load) == {"semseg", "edge"}
    for arr in load.values():
        assert arr.shape == (2, 4)  # 2 MoE layers (blocks 1, 3), 4 experts
        torch.testing.assert_close(torch.from_numpy(arr.sum(1)), torch.full((2,), 2.0).double())
    assert osp.getsize(png) > 0
    out = capsys.readouterr().out
    # the progress bar counts the 4 test images, not the --max-images default of 50
    assert "] 4/4," in out and "/50" not in out
    assert "top-k = 2 per token" in out and "busiest, share:" in out
    blocks = [line.split()[2] for line in out.splitlines() if line.startswith("semseg ")]
    assert blocks == ["1", "3"]
    import json

    # --json writes what the tool returns; --max-images bounds the images routed
    js = str(tmp_path / "routing.json")
    three = routing_tool.main([config, ckpt, "--json", js, "--out", png, "--max-images", "3"])
    payload = json.load(open(js))
    assert payload["images"] == 3 and payload["split"] == "test"
    assert payload["load"] == {t: a.tolist() for t, a in three.items()}
    # without a checkpoint: the randomly initialised model, the same for the same seed
    args = [config, "--json", js, "--out", png, "--max-images", "2", "--init-seed", "3"]
    first = routing_tool.main(args)
    assert json.load(open(js))["checkpoint"] is None
    again = routing_tool.main(args)
    for t in first:
        assert (first[t] == again[t]).all()
        torch.testing.assert_close(
            torch.from_numpy(first[t].sum(1)), torch.full((2,), 2.0).double()
        )


def test_demo_trivial_predictors_match_direct_computation(config: str, data_root: str) -> None:
    """The demo's mean-depth / mean-normal baselines, recomputed with plain numpy."""
    import numpy as np
    from mmengine.config import Config

    demo = load_tool("tools/demo.py", "m3vit_tools_demo")
    cfg = Config.fromfile(config)
    tasks = ["semseg", "depth", "normals", "edge"]
    stats = demo.fit_trivial(cfg, tasks)
    trivial = demo.evaluate_trivial(cfg, stats)

    def ids(split: str) -> list[str]:
        with open(osp.join(data_root, "gt_sets", f"{split}.txt")) as f:
            return f.read().split()

    # training statistics over the training part of train (the 10% hold-out excluded)
    from mmseg.registry import DATASETS

    train_set = DATASETS.build(cfg.train_dataloader.dataset)
    train_ids = [osp.splitext(osp.basename(d["img_path"]))[0] for d in train_set.load_data_list()]
    assert len(train_ids) == 11 and set(train_ids) < set(ids("train"))
    depths = [np.load(osp.join(data_root, "depth", f"{i}.npy")) for i in train_ids]
    mean_depth = np.concatenate([d[d > 0] for d in depths]).mean()
    assert stats["depth"] == pytest.approx(mean_depth, rel=1e-5)
    val = [np.load(osp.join(data_root, "depth", f"{i}.npy")) for i in ids("val")]
    err = np.concatenate([(d[d > 0] - stats["depth"]) ** 2 for d in val])
    assert trivial["depth/rmse"] == pytest.approx(np.sqrt(err.mean()), rel=1e-5)

    normals = [np.load(osp.join(data_root, "normals", f"{i}.npy")) for i in ids("val")]
    n = np.concatenate([v.reshape(-1, 3) for v in normals])
    n = n[np.any(n != 0, axis=1)]
    cos = np.clip(n @ np.asarray(stats["normals"]) / np.linalg.norm(n, axis=1), -1, 1)
    assert trivial["normals/mean"] == pytest.approx(np.degrees(np.arccos(cos)).mean(), rel=1e-3)
    assert trivial["edge/odsF"] == 0.0
    assert 0 <= stats["semseg"] < 40


def test_test_tool_missing_checkpoint_is_one_line(tmp_path, config, capsys) -> None:
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(SystemExit) as err:
        test_tool.main([config, missing])
    assert err.value.code == 2
    msg = capsys.readouterr().err
    assert msg == f"test.py: error: checkpoint {missing!r} does not exist\n"
