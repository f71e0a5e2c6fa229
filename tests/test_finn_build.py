"""finn_flow/build.py end to end on a tiny pathway, for every NYUD task.

One tiny config (D 16, 1 MoE block, 1 head, 4 experts top-2, 8x8 input with 4x4
patches, PUP heads with 8 channels and num_up=0: conv3x3, conv1x1, nearest x2 and the
exact final nearest x2 resize, 2x2 -> 8x8) keeps each build short.

Weights: the normals build uses a genuine checkpoint of a 2-iteration ``tools/train.py``
run on a tiny synthetic NYUD set (also its val split: calibration, verification on 8
val images, the val metric); semseg and depth use a checkpoint with non-zero biases,
LayerNorm / BatchNorm affines and statistics (every threshold table per channel); edge
uses random weights (the path without a checkpoint). The semseg build runs in
``--mode codegen`` (HLS/RTL sources).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.finn, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FPGA_CONFIG = REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]
VERIFY_IMAGES = 8

TINY = f"""
_base_ = [{str(FPGA_CONFIG)!r}]
model = dict(
    backbone=dict(
        img_size=(8, 8), patch_size=4, embed_dims=16, num_layers=1, num_heads=1,
        moe_layers=[0], num_experts=4, top_k=2, expert_hidden_dims=8,
    ),
    decode_heads=dict(
        semseg=dict(channels=8, num_up=0),
        depth=dict(channels=8, num_up=0),
        normals=dict(channels=8, num_up=0),
        edge=dict(channels=8, num_up=0),
    ),
)
fpga = dict(input_size=(8, 8), calib_images=2, target_fps=10000, val_images=4)
"""

#: the tiny config on a tiny synthetic NYUD set, trainable with tools/train.py
TRAINABLE = """
_base_ = [{tiny!r}]
data_root = {root!r}
train_dataloader = dict(batch_size=2, num_workers=0, persistent_workers=False,
                        dataset=dict(data_root=data_root, holdout=None))
val_dataloader = dict(num_workers=0, persistent_workers=False,
                      dataset=dict(data_root=data_root, split="val", holdout=None))
test_dataloader = val_dataloader
train_cfg = dict(max_iters=2, val_interval=100)
param_scheduler = [dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=2, by_epoch=False)]
default_hooks = dict(logger=dict(interval=1),
                     checkpoint=dict(interval=2, save_best=None, save_last=True))
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny_fpga.py"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def trained(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(config with the data set, checkpoint) of a 2-iteration tools/train.py run."""
    from mmseg_m3vit.datasets.synthetic_nyud import generate

    tmp = tmp_path_factory.mktemp("trained")
    root = tmp / "synthetic_nyud"
    generate(str(root), 4, VERIFY_IMAGES, size=(32, 48), workers=1, progress=False)
    cfg = tmp / "tiny_trainable.py"
    cfg.write_text(TRAINABLE.format(tiny=str(tiny_config), root=str(root)))
    work = tmp / "work"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tools" / "train.py"), str(cfg), "--work-dir", str(work)],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cfg, work / "iter_2.pth"


@pytest.fixture(scope="module")
def perturbed(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint of the tiny model with non-zero biases, LayerNorm / BatchNorm affines
    and BatchNorm statistics (random init has zero biases and identity affines)."""
    import torch
    from mmengine.config import Config

    from finn_flow.float_model import build_float_pathway

    model = build_float_pathway(Config.fromfile(tiny_config), "semseg", None, 1).model
    gen = torch.Generator().manual_seed(7)
    state = {}
    for key, value in model.state_dict().items():
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        noise = torch.randn(value.shape, generator=gen) if floating else None
        if noise is None:  # integer buffers, the backbone's task names
            state[key] = value
        elif key.endswith("running_var"):
            state[key] = 0.5 + noise.abs()
        elif key.endswith(("bias", ".b1", ".b2", "running_mean")):
            state[key] = 0.05 * noise
        elif key.endswith("weight") and value.dim() == 1:  # LayerNorm / BatchNorm gain
            state[key] = 1.0 + 0.2 * noise
        else:
            state[key] = value
    path = tmp_path_factory.mktemp("ckpt") / "perturbed.pth"
    torch.save({"state_dict": state, "meta": {"test": "non-zero biases"}}, path)
    return path


@pytest.fixture(scope="module")
def builds(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Builds run so far (lazily, cached for the module)."""
    return {"_root": tmp_path_factory.mktemp("builds"), "_config": tiny_config}


def _build(builds: dict, task: str, *extra: str, config: Path | None = None) -> tuple[int, Path]:
    from finn_flow import build

    key = (task, extra)
    if key not in builds:
        name = "-".join([task, *(Path(e).stem if "/" in e else e for e in extra)])
        out = builds["_root"] / name
        cfg = str(config or builds["_config"])
        rc = build.main(["--task", task, "--config", cfg, "--out", str(out), *extra])
        builds[key] = (rc, out)
    return builds[key]


def _task_build(builds: dict, task: str, trained, perturbed) -> tuple[int, Path]:
    """The build of ``task`` with the weights the module docstring says."""
    if task == "normals":
        cfg, ckpt = trained
        return _build(builds, task, "--checkpoint", str(ckpt), config=cfg)
    if task == "semseg":
        return _build(
            builds, task, "--checkpoint", str(perturbed), "--mode", "codegen", "--dump-ddr"
        )
    if task == "depth":
        return _build(builds, task, "--checkpoint", str(perturbed))
    return _build(builds, task)


@pytest.mark.parametrize("task", NYUD_TASKS)
def test_tiny_build_finishes_and_verifies(builds: dict, task: str, trained, perturbed) -> None:
    rc, out = _task_build(builds, task, trained, perturbed)
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary.get("error")
    assert (out / "COMPLETE").is_file()
    assert summary["status"] == "complete" and summary["task"] == task
    assert summary["random_weights"] is (task == "edge")
    ver = {v["stage"]: v for v in summary["verification"]}
    assert set(ver) == {"streamlined", "hw_layers"}
    for v in ver.values():
        assert v["images"] == VERIFY_IMAGES and len(v["max_error_lsb_per_image"]) == VERIFY_IMAGES
        assert v["max_lsb_bound"] == summary["max_lsb"]
    # the build enforces its bound (--max-lsb, default 8 output LSBs) on every image; with
    # the reordered engine the HW graph computes what the streamlined one does
    assert ver["hw_layers"]["max_error_lsb"] <= summary["max_lsb"] == 8.0
    assert ver["hw_layers"]["max_error_lsb_per_image"] == pytest.approx(
        ver["streamlined"]["max_error_lsb_per_image"], abs=1e-3
    )
    if task == "edge":  # zero biases: every op exact but float LayerNorm/softmax, <= 1 LSB
        assert ver["hw_layers"]["max_error_lsb"] <= 1.0 + 1e-4
    # the task head is part of the design: NHWC logits at the input size
    channels = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}[task]
    assert np.load(out / "expected_output.npy").shape == (1, 8, 8, channels)
    assert np.load(out / "input.npy").shape == (1, 5, 48)
    stacked = np.load(out / "verify_expected_output.npy")
    assert stacked.shape == (VERIFY_IMAGES, 1, 8, 8, channels)
    np.testing.assert_array_equal(stacked[0], np.load(out / "expected_output.npy"))
    assert len({a.tobytes() for a in stacked}) == VERIFY_IMAGES  # 8 different frames
    assert (out / "model_qonnx.onnx").is_file()
    on_fpga = " ".join(summary["pathway"]["on_fpga"])
    assert "PUP head" in on_fpga and "final nearest x2x2" in on_fpga
    assert not any("resize of the" in h for h in summary["pathway"]["on_host"])
    ops = {layer["op_type"] for layer in summary["resources"]["layers"]}
    assert {"UpsampleNearestNeighbour_hls", "ConvolutionInputGenerator_rtl"} <= ops, ops
    # the config's folding JSON is the default design's (finn_flow/folding/normals.json):
    # the tiny design is another, so the build auto-folds and says why
    if task == "normals":
        fold = summary["folding"]
        assert fold["applied"] is False and fold["target_fps"] == 10000
        assert "of its nodes are not in the design" in fold["mismatch"]
        assert "was made for another design" in (out / "SUMMARY.md").read_text()
    # the reordered MoE engine, swapped in after a check on every verification image
    assert summary["moe_form"] == "reordered" and summary["moe"]["form"] == "reordered"
    assert {"TopKGate_hls", "ExpertDispatch_hls", "ExpertFFN_hls", "ExpertCombine_hls"} <= ops
    (layer,) = summary["moe"]["layers"]
    assert layer["swap_check"] == {
        "inputs": VERIFY_IMAGES, "identical": True, "compared": ["gate codes", "output"]
    }  # fmt: skip
    assert len(layer["cycles_val_per_image"]) == VERIFY_IMAGES
    assert layer["cycles_val_max"] <= layer["cycles_worst_case"]
    assert (
        0
        < layer["expert_ddr_bytes_per_frame"]["mean"]
        <= layer["expert_ddr_bytes_per_frame"]["worst"]
    )
    perf = summary["performance"]
    io = perf["ddr_bytes"]["input_patches"] + perf["ddr_bytes"]["output_logits"]
    assert io == (5 * 48 + 8 * 8 * channels) * 8 / 8  # 8-bit patches in, 8-bit logits out
    assert perf["ddr_bytes_per_frame"] == io + layer["expert_ddr_bytes_per_frame"]["worst"]


def test_trained_checkpoint_feeds_the_flow_without_opt_in(builds: dict, trained, perturbed) -> None:
    """A genuine tools/train.py checkpoint loads without --trust-checkpoint, and the build
    runs on its config's val split (calibration, verification, metric)."""
    rc, out = _task_build(builds, "normals", trained, perturbed)
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary.get("error")
    assert summary["checkpoint"] == str(trained[1])
    assert summary["checkpoint_meta"]["iter"] == 2  # the Runner's meta, read back
    assert summary["calibration"].startswith("val split of")
    assert summary["verification_images"].startswith(f"{VERIFY_IMAGES} of the val split")
    val = summary["float_vs_quant"]["val_metric"]
    assert isinstance(val, dict) and val["images"] == 4, val
    assert val["primary"] == "normals/mean" and 0 < val["float_primary"] < 180


def test_codegen_writes_sources(builds: dict, trained, perturbed) -> None:
    """--mode codegen finishes and every layer has generated HLS C++ / Verilog sources."""
    rc, out = _task_build(builds, "semseg", trained, perturbed)
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary.get("error")
    assert "step_hw_codegen" in summary["steps"]
    cg = summary["codegen"]
    assert cg["layers"] == len(summary["resources"]["layers"])
    per_layer = cg["sources_per_layer"]
    assert all(per_layer.values()), [k for k, v in per_layer.items() if not v]
    assert any(f.endswith(".cpp") for f in sum(per_layer.values(), []))
    assert any(f.endswith((".v", ".sv")) for f in sum(per_layer.values(), []))
    for name, files in per_layer.items():
        assert any(Path(cg["folder"]).glob(f"code_gen_ipgen_{name}_*/{files[0]}")), name
    assert "Generated sources" in (out / "SUMMARY.md").read_text()


def test_dump_ddr_writes_the_expert_images(builds: dict, trained, perturbed) -> None:
    """--dump-ddr: one AXI-aligned image per MoE layer, as large as the engine says."""
    rc, out = _task_build(builds, "semseg", trained, perturbed)
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    layout = json.loads((out / "ddr" / "moe_experts.json").read_text())
    blob = (out / "ddr" / "moe_experts.bin").read_bytes()
    assert len(blob) == layout["bytes"] == summary["ddr_image"]["bytes"]
    (node,) = layout["nodes"]
    (layer,) = summary["moe"]["layers"]
    assert node["bytes"] == layer["ddr_image_bytes"] and len(node["experts"]) == 4
    stride = node["experts"][1]["offset"] - node["experts"][0]["offset"]
    assert stride % (128 // 8) == 0  # every expert starts on a 128-bit AXI word
    assert any(blob[node["ddr_offset"] : node["ddr_offset"] + node["bytes"]])


def test_summary_consistent_with_finn_reports(builds: dict, trained, perturbed) -> None:
    rc, out = _task_build(builds, "edge", trained, perturbed)
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    report = out / "finn" / "report"
    finn_res = json.loads((report / "estimate_layer_resources.json").read_text())
    perf = json.loads((report / "estimate_network_performance.json").read_text())
    res = summary["resources"]
    keys = ("LUT", "FF", "BRAM_18K", "URAM", "DSP")
    for k in keys:
        assert res["total"][k] == pytest.approx(sum(layer[k] for layer in res["layers"]))
    for layer in res["layers"]:
        if layer["source"] == "finn-plus":
            for k in ("LUT", "BRAM_18K", "DSP"):
                assert layer[k] == pytest.approx(float(finn_res[layer["name"]].get(k, 0)))
    own = [layer for layer in res["layers"] if layer["source"] != "finn-plus"]
    assert own, "expected own cost models for layers finn-plus estimates as zero"
    assert any(layer["op_type"].startswith("ScaledDotProductAttention") for layer in own)
    p = summary["performance"]
    assert p["max_cycles_per_frame (bottleneck layer)"] == perf["max_cycles"]
    clk_ns = 1000.0 / p["clock_MHz"]
    assert p["throughput_fps"] == pytest.approx(1e9 / (clk_ns * perf["max_cycles"]))
    assert p["latency_ms"] == pytest.approx(perf["critical_path_cycles"] * clk_ns * 1e-6)
    assert p["ddr_bytes_per_frame"] > 0
    assert summary["board_capacity"]["LUT"] == 230400
    assert summary["finn"]["finn_version"].startswith("1.6")
    md = (out / "SUMMARY.md").read_text()
    assert "RANDOM WEIGHTS" in md and "Vivado 2024.2" in md and "stand-in" in md
    assert "On the FPGA" in md and "On the host" in md and "PUP head" in md
    assert "does not claim" in md and "no RTL simulation" in md


def test_rerun_into_same_out_with_saved_folding(
    builds: dict, trained, perturbed, tmp_path: Path
) -> None:
    """Re-running into the same --out replaces the old build; a saved folding re-applies."""
    rc, out = _task_build(builds, "depth", trained, perturbed)
    assert rc == 0
    first = json.loads((out / "summary.json").read_text())
    (out / "finn" / "stale_marker.txt").write_text("from an older build")
    finished = json.loads((out / "COMPLETE").read_text())["finished"]
    folding = tmp_path / "depth_folding.json"
    shutil.copy(out / "folding.json", folding)
    from finn_flow import build

    args = ["--task", "depth", "--config", str(builds["_config"]), "--out", str(out)]
    rc2 = build.main([*args, "--checkpoint", str(perturbed), "--folding", str(folding)])
    assert rc2 == 0
    assert json.loads((out / "COMPLETE").read_text())["finished"] > finished
    assert not (out / "finn" / "stale_marker.txt").exists()
    second = json.loads((out / "summary.json").read_text())
    assert second["folding"]["folding_json"] == str(folding)
    assert second["folding"]["applied"] is True  # saved from this design: it fits
    key = "max_cycles_per_frame (bottleneck layer)"
    assert second["performance"][key] == first["performance"][key]


def test_interrupted_build_is_never_complete(
    builds: dict, trained, perturbed, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, done = _task_build(builds, "edge", trained, perturbed)
    assert rc == 0
    out = tmp_path / "copy"
    shutil.copytree(done, out)
    assert (out / "COMPLETE").exists()
    from finn_flow import build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "run_steps", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build.main(["--task", "edge", "--config", str(builds["_config"]), "--out", str(out)])
    assert not (out / "COMPLETE").exists()

    def broken(*args, **kwargs):
        raise build.BuildError("simulated failure in a FINN step")

    monkeypatch.setattr(build, "run_steps", broken)
    rc = build.main(["--task", "edge", "--config", str(builds["_config"]), "--out", str(out)])
    assert rc == 1
    assert not (out / "COMPLETE").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed" and "simulated failure" in summary["error"]


def _expect_exit(args: list[str], capsys: pytest.CaptureFixture, match: str) -> None:
    from finn_flow import build

    with pytest.raises(SystemExit) as exc:
        build.main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert match in err, err


def test_help_shows_defaults_and_tasks(capsys: pytest.CaptureFixture) -> None:
    from finn_flow import build

    with pytest.raises(SystemExit) as exc:
        build.parse_args(["--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "the default config has semseg, depth, normals, edge" in text
    for default in ("(default: normals)", "(default: reordered)", "(default: estimate)",
                    "(default: ZCU104)", "(default: 10)"):  # fmt: skip
        assert default in text, default


def test_dump_ddr_needs_the_reordered_engine(
    tiny_config: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _expect_exit(
        ["--task", "depth", "--config", str(tiny_config), "--out", str(tmp_path / "o"),
         "--moe", "standin", "--dump-ddr"],
        capsys,
        "--dump-ddr writes the reordered MoE engine's expert images",
    )  # fmt: skip


def test_wrong_task_fails_clearly(tiny_config: Path, tmp_path: Path, capsys) -> None:
    _expect_exit(
        ["--task", "sal", "--config", str(tiny_config), "--out", str(tmp_path / "o")],
        capsys,
        "unknown task 'sal'",
    )


def test_missing_checkpoint_fails_clearly(tiny_config: Path, tmp_path: Path, capsys) -> None:
    missing = tmp_path / "nope.pth"
    _expect_exit(
        [
            "--task",
            "depth",
            "--config",
            str(tiny_config),
            "--checkpoint",
            str(missing),
            "--out",
            str(tmp_path / "o"),
        ],
        capsys,
        f"checkpoint {str(missing)!r} does not exist",
    )


def test_unwritable_out_fails_clearly(tiny_config: Path, tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    _expect_exit(
        ["--task", "depth", "--config", str(tiny_config), "--out", str(blocker / "sub")],
        capsys,
        "is not writable",
    )


def test_harmful_checkpoint_is_refused(
    tiny_config: Path, tmp_path: Path, harmful_checkpoint: tuple[Path, Path]
) -> None:
    """A checkpoint whose unpickling would run code is refused before it runs."""
    from finn_flow import build

    ckpt, marker = harmful_checkpoint
    out = tmp_path / "o"
    args = ["--task", "depth", "--config", str(tiny_config), "--checkpoint", str(ckpt)]
    assert build.main([*args, "--out", str(out)]) == 1
    assert not marker.exists()
    assert not (out / "COMPLETE").exists()
    error = json.loads((out / "summary.json").read_text())["error"]
    assert str(ckpt) in error and "--trust-checkpoint" in error, error


def test_checkpoint_of_another_model_is_refused(tiny_config: Path, tmp_path: Path) -> None:
    """Strict loading: a missing tensor is named, nothing is built from random weights."""
    import torch
    from mmengine.config import Config

    from finn_flow import build
    from finn_flow.float_model import build_float_pathway

    state = build_float_pathway(Config.fromfile(tiny_config), "depth", None, 0).model.state_dict()
    del state["backbone.blocks.0.moe.b2"]
    ckpt = tmp_path / "partial.pth"
    torch.save({"state_dict": state}, ckpt)
    out = tmp_path / "o"
    args = ["--task", "depth", "--config", str(tiny_config), "--checkpoint", str(ckpt)]
    assert build.main([*args, "--out", str(out)]) == 1
    error = json.loads((out / "summary.json").read_text())["error"]
    assert "missing from the checkpoint" in error and "backbone.blocks.0.moe.b2" in error, error
