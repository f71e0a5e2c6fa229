"""Safe checkpoint loading: the allow-list is what our Runner's checkpoints hold, every
entry point refuses a harmful pickle (its side effect never happens) unless the user opts
in, URLs likewise; strict full-model loading names what does not match."""

from __future__ import annotations

import functools
import http.server
import importlib.util
import os
import os.path as osp
import pickle
import threading
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.registry import init_default_scope
from mmengine.runner import Runner
from mmengine.runner import checkpoint as mme_checkpoint
from mmengine.runner.checkpoint import CheckpointLoader

import mmseg_m3vit  # noqa: F401  (installs the loader, registers the plugin)
from mmseg_m3vit.compat.checkpoint import (
    TRUST_ENV,
    CheckpointMismatchError,
    UntrustedCheckpointError,
    allowed_global_names,
    load_checkpoint_file,
    load_model_checkpoint,
    trust_from_env,
    trusted_checkpoints,
)

ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))


def load_tool(relpath: str, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, relpath))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def no_trust_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TRUST_ENV, raising=False)


# --------------------------------------------------------------------------- real runs
@pytest.fixture(scope="module")
def runner_checkpoints(
    tmp_path_factory: pytest.TempPathFactory, tiny_nyud_root: str, write_tiny_config
) -> dict[str, str]:
    """Checkpoints of a real 4-iteration Runner run with validation and the
    best-checkpoint hook, resumed for 2 more: interval, best and resumed files; and a
    task-conditioned run with AdamW and gradient clipping."""
    tmp = tmp_path_factory.mktemp("runs")
    extra = """
    train_cfg = dict(max_iters=4, val_interval=2)
    default_hooks = dict(checkpoint=dict(interval=2, max_keep_ckpts=-1,
                         save_best='multitask/delta_m', rule='greater', save_last=True))
    """
    cfg_path = write_tiny_config(str(tmp / "best.py"), tiny_nyud_root, extra)
    tc_extra = (
        extra
        + """
    model = dict(backbone=dict(router='task_conditioned'))
    optim_wrapper = dict(optimizer=dict(_delete_=True, type='AdamW', lr=1e-3),
                         clip_grad=dict(_delete_=True, max_norm=1.0))
    """
    )
    tc_path = write_tiny_config(str(tmp / "tc.py"), tiny_nyud_root, tc_extra)
    files = {}
    for name, path in (("mg", cfg_path), ("tc", tc_path)):
        work = str(tmp / name)
        for max_iters, resume in ((4, False), (6, True)):
            cfg = Config.fromfile(path)
            cfg.work_dir, cfg.resume = work, resume
            cfg.train_cfg.max_iters = max_iters
            cfg.experiment_name = f"{name}_{max_iters}"
            Runner.from_cfg(cfg).train()
        for f in sorted(os.listdir(work)):
            if f.endswith(".pth"):
                files[f"{name}/{f}"] = osp.join(work, f)
    init_default_scope("mmseg")
    assert {"mg/iter_2.pth", "mg/iter_6.pth", "tc/iter_6.pth"} <= set(files), files
    assert any(k.startswith("mg/best_") for k in files), files
    return files


def _same(a, b, where: str = "") -> None:
    """Deep equality of two unpickled objects (tensors, arrays, HistoryBuffers)."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert list(a) == list(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, HistoryBuffer):
        _same(a.data, b.data, where)
        assert a.max_length == b.max_length, where
    elif callable(a):
        assert a is b, where
    else:
        assert a == b or (a != a and b != b), where


def test_allow_list_is_exactly_what_runner_checkpoints_hold(runner_checkpoints) -> None:
    allowed = set(allowed_global_names())
    needed = set()
    for path in runner_checkpoints.values():
        needed |= set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    # every global the files hold is allowed, and every allowed one except the numpy-1.x
    # aliases is actually used (the list is not padded with guesses)
    assert needed <= allowed, needed - allowed
    # not pickled as globals: numpy-1.x names of the same two functions, and the dtype
    # classes whose state the loader restores (without them the files do not load)
    assert allowed - needed == {
        "numpy.core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy.dtypes.Float64DType",
        "numpy.dtypes.Int64DType",
    }
    for name, path in runner_checkpoints.items():
        # torch's own default refuses them: the allow-list is what makes them load
        with pytest.raises(pickle.UnpicklingError):
            torch.load(path, weights_only=True)
        safe = load_checkpoint_file(path)
        _same(safe, torch.load(path, map_location="cpu", weights_only=False), name)
        assert safe["state_dict"]["backbone._extra_state"].dtype == torch.uint8


def test_statistics_getattr_refuses_other_attributes(tmp_path) -> None:
    class Reach:
        def __reduce__(self):
            return (getattr, (HistoryBuffer, "__init__"))

    torch.save({"x": Reach()}, tmp_path / "getattr.pth")
    with pytest.raises(pickle.UnpicklingError, match="__init__"):
        load_checkpoint_file(str(tmp_path / "getattr.pth"))


# --------------------------------------------------------------------------- refusal
def test_loader_refuses_harmful_pickle_and_opt_ins_work(harmful_checkpoint, monkeypatch) -> None:
    path, marker = harmful_checkpoint
    with pytest.raises(UntrustedCheckpointError) as err:
        load_checkpoint_file(str(path))
    msg = str(err.value)
    assert str(path) in msg and "io.open" in msg
    assert "--trust-checkpoint" in msg and TRUST_ENV in msg
    assert not marker.exists()
    # mmengine's own entry (Runner.load_checkpoint / resume / load_from use it)
    with pytest.raises(UntrustedCheckpointError):
        CheckpointLoader.load_checkpoint(str(path), map_location="cpu")
    assert not marker.exists()
    # opting in: the flag's context, the environment variable, the argument
    with trusted_checkpoints(True):
        load_checkpoint_file(str(path))
    assert marker.exists() and TRUST_ENV not in os.environ
    marker.unlink()
    monkeypatch.setenv(TRUST_ENV, "1")
    load_checkpoint_file(str(path))
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv(TRUST_ENV, "maybe")
    with pytest.raises(ValueError, match=f"{TRUST_ENV}='maybe'"):
        trust_from_env()
    load_checkpoint_file(str(path), trust=True)
    assert marker.exists()


def test_tools_refuse_harmful_checkpoint(
    harmful_checkpoint, tmp_path, tiny_nyud_root, write_tiny_config
) -> None:
    path, marker = harmful_checkpoint
    cfg = write_tiny_config(str(tmp_path / "tiny.py"), tiny_nyud_root)
    test_tool = load_tool("tools/test.py", "m3vit_ckpt_test_tool")
    train_tool = load_tool("tools/train.py", "m3vit_ckpt_train_tool")
    routing_tool = load_tool("tools/analysis_tools/routing.py", "m3vit_ckpt_routing_tool")
    calls = {
        "tools/test.py": lambda: test_tool.main([cfg, str(path), "--work-dir", str(tmp_path)]),
        "tools/train.py --resume": lambda: train_tool.main(
            [cfg, "--resume", str(path), "--work-dir", str(tmp_path / "w")]
        ),
        "model.backbone.pretrained": lambda: train_tool.main(
            [
                cfg,
                "--work-dir",
                str(tmp_path / "p"),
                "--cfg-options",
                f"model.backbone.pretrained={path}",
            ]
        ),  # fmt: skip
        "routing.py": lambda: routing_tool.main([cfg, str(path), "--out", str(tmp_path / "r")]),
    }
    for name, call in calls.items():
        with pytest.raises(UntrustedCheckpointError) as err:
            call()
        assert str(path) in str(err.value), name
        assert not marker.exists(), f"{name} ran the pickle"
    init_default_scope("mmseg")
    # --trust-checkpoint really lets it through (the file then fails as a model, later)
    with pytest.raises(Exception) as err:
        routing_tool.main([cfg, str(path), "--out", str(tmp_path / "r"), "--trust-checkpoint"])
    assert not isinstance(err.value, UntrustedCheckpointError)
    assert marker.exists()
    assert TRUST_ENV not in os.environ


@pytest.fixture
def http_server(tmp_path: Path):
    """Serve ``tmp_path / 'www'`` on 127.0.0.1; yields (directory, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))

    class Quiet(handler.func):
        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Quiet, directory=str(www))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_urls_are_loaded_safely(harmful_checkpoint, http_server, tmp_path, monkeypatch) -> None:
    path, marker = harmful_checkpoint
    www, base = http_server
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    (www / "harmful.pth").write_bytes(path.read_bytes())
    torch.save({"state_dict": {"w": torch.arange(3.0)}}, www / "genuine.pth")
    with pytest.raises(UntrustedCheckpointError, match="harmful.pth"):
        CheckpointLoader.load_checkpoint(f"{base}/harmful.pth")
    # mmengine's torchvision:// / mmcls:// / open-mmlab:// schemes call load_from_http
    with pytest.raises(UntrustedCheckpointError):
        mme_checkpoint.load_from_http(f"{base}/harmful.pth", map_location="cpu")
    assert not marker.exists()
    got = CheckpointLoader.load_checkpoint(f"{base}/genuine.pth")
    assert torch.equal(got["state_dict"]["w"], torch.arange(3.0))
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / "genuine.pth").is_file()


# --------------------------------------------------------------------------- strict
def _tiny_model(**backbone):
    from mmseg.registry import MODELS

    init_default_scope("mmseg")
    losses = dict(semseg="PixelCrossEntropyLoss", depth="DepthL1Loss")
    heads = {
        t: dict(type="PUPHead", num_classes=c, channels=8, num_up=1,
                loss_decode=dict(type=losses[t]))
        for t, c in (("semseg", 5), ("depth", 1))
    }  # fmt: skip
    bcfg = dict(
        type="M3ViT", img_size=(32, 32), embed_dims=16, num_layers=2, num_heads=2,
        num_experts=4, top_k=2, expert_hidden_dims=8,
    )  # fmt: skip
    bcfg.update(backbone)
    cfg = dict(type="MultiTaskSegmentor", backbone=bcfg, decode_heads=heads)
    return MODELS.build(cfg)


def test_strict_loading_names_mismatches_and_loads_nothing(tmp_path) -> None:
    torch.manual_seed(0)
    eight = _tiny_model(num_experts=8)
    torch.save({"state_dict": eight.state_dict(), "meta": {"iter": 3}}, tmp_path / "e8.pth")
    torch.manual_seed(1)
    four = _tiny_model()
    before = {k: v.clone() for k, v in four.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as err:
        load_model_checkpoint(four, str(tmp_path / "e8.pth"))
    msg = str(err.value)
    assert "e8.pth" in msg and "different shapes" in msg
    assert "backbone.blocks.1.moe.w1 (8, 16, 8) (model: (4, 16, 8))" in msg
    for k, v in four.state_dict().items():  # nothing was copied
        assert torch.equal(v, before[k]), k
    # missing / unexpected keys are named too
    sd = eight.state_dict()
    sd = {("heads.extra." + k[len("heads.depth.") :] if k.startswith("heads.depth.") else k): v
          for k, v in sd.items()}  # fmt: skip
    torch.save(sd, tmp_path / "renamed.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing from the checkpoint \d+: heads"):
        load_model_checkpoint(_tiny_model(num_experts=8), str(tmp_path / "renamed.pth"))
    with pytest.raises(CheckpointMismatchError, match=r"not in the model \d+: heads.extra"):
        load_model_checkpoint(_tiny_model(num_experts=8), str(tmp_path / "renamed.pth"))
    # a match loads everything and returns the meta; prefix loads a part
    same = _tiny_model(num_experts=8)
    assert load_model_checkpoint(same, str(tmp_path / "e8.pth")) == {"iter": 3}
    for k, v in eight.state_dict().items():
        assert torch.equal(same.state_dict()[k], v), k
    head = _tiny_model(num_experts=8).heads["depth"]
    load_model_checkpoint(head, str(tmp_path / "e8.pth"), prefix="heads.depth.")
    assert torch.equal(head.conv_seg.weight, eight.heads["depth"].conv_seg.weight)
