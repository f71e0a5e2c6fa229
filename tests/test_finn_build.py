"""finn_flow/build.py end to end on a tiny pathway, for every NYUD task.

One tiny config (D 16, 1 MoE block, 1 head, 4 experts top-2, 8x8 input with 4x4
patches, PUP heads with 8 channels and num_up=0: conv3x3, conv1x1, nearest x2 and the
exact final nearest x2 resize, 2x2 -> 8x8) keeps each build under a minute on 2 cores.
The semseg build runs in ``--mode codegen`` (HLS/RTL sources; about 0.5 s more).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.finn, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FPGA_CONFIG = REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
NYUD_TASKS = ["semseg", "depth", "normals", "edge"]

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
fpga = dict(input_size=(8, 8), calib_images=2, target_fps=10000)
"""


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny_fpga.py"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def builds(tiny_config: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run the build once per task (lazily, cached for the module)."""
    return {"_root": tmp_path_factory.mktemp("builds"), "_config": tiny_config}


def _build(builds: dict, task: str, *extra: str) -> tuple[int, Path]:
    from finn_flow import build

    key = (task, extra)
    if key not in builds:
        out = builds["_root"] / f"{task}{'-'.join(('',) + extra)}"
        rc = build.main(
            ["--task", task, "--config", str(builds["_config"]), "--out", str(out)] + list(extra)
        )
        builds[key] = (rc, out)
    return builds[key]


#: extra build options per task (the semseg build also generates the HLS/RTL sources)
TASK_ARGS = {"semseg": ("--mode", "codegen")}


@pytest.mark.parametrize("task", NYUD_TASKS)
def test_tiny_build_finishes_and_verifies(builds: dict, task: str) -> None:
    rc, out = _build(builds, task, *TASK_ARGS.get(task, ()))
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary.get("error")
    assert (out / "COMPLETE").is_file()
    assert summary["status"] == "complete" and summary["task"] == task
    assert summary["random_weights"] is True
    ver = {v["stage"]: v for v in summary["verification"]}
    assert set(ver) == {"streamlined", "hw_layers"}
    # every op is exact except float LayerNorm/softmax/scales: at most 1 LSB, rarely
    assert ver["hw_layers"]["max_error_lsb"] <= 1.0 + 1e-4  # float32 LSB ratio
    assert ver["hw_layers"]["mean_error_lsb"] < 0.1
    assert (out / "input.npy").is_file() and (out / "expected_output.npy").is_file()
    assert (out / "model_qonnx.onnx").is_file()
    # the task head is part of the design: NHWC logits at the input size
    expected = __import__("numpy").load(out / "expected_output.npy")
    channels = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}[task]
    assert expected.shape == (1, 8, 8, channels)
    on_fpga = " ".join(summary["pathway"]["on_fpga"])
    assert "PUP head" in on_fpga and "final nearest x2x2" in on_fpga
    assert not any("resize of the" in h for h in summary["pathway"]["on_host"])
    ops = {layer["op_type"] for layer in summary["resources"]["layers"]}
    assert {"UpsampleNearestNeighbour_hls", "ConvolutionInputGenerator_rtl"} <= ops, ops


def test_codegen_writes_sources(builds: dict) -> None:
    """--mode codegen finishes and every layer has generated HLS C++ / Verilog sources."""
    rc, out = _build(builds, "semseg", *TASK_ARGS["semseg"])
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


def test_summary_consistent_with_finn_reports(builds: dict) -> None:
    rc, out = _build(builds, "normals")
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


def test_rerun_into_same_out_with_saved_folding(builds: dict, tmp_path: Path) -> None:
    """Re-running into the same --out replaces the old build; a saved folding re-applies."""
    rc, out = _build(builds, "depth")
    assert rc == 0
    first = json.loads((out / "summary.json").read_text())
    (out / "finn" / "stale_marker.txt").write_text("from an older build")
    finished = json.loads((out / "COMPLETE").read_text())["finished"]
    folding = tmp_path / "depth_folding.json"
    shutil.copy(out / "folding.json", folding)
    from finn_flow import build

    args = ["--task", "depth", "--config", str(builds["_config"]), "--out", str(out)]
    rc2 = build.main([*args, "--folding", str(folding)])
    assert rc2 == 0
    assert json.loads((out / "COMPLETE").read_text())["finished"] > finished
    assert not (out / "finn" / "stale_marker.txt").exists()
    second = json.loads((out / "summary.json").read_text())
    assert second["folding"]["folding_json"] == str(folding)
    key = "max_cycles_per_frame (bottleneck layer)"
    assert second["performance"][key] == first["performance"][key]


def test_interrupted_build_is_never_complete(
    builds: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rc, done = _build(builds, "edge")
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


class _TouchOnLoad:
    """Unpickling this object creates the file ``path`` (a stand-in for harmful code)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_harmful_checkpoint_is_refused(tiny_config: Path, tmp_path: Path) -> None:
    """A checkpoint whose unpickling would run code is refused before it runs."""
    import torch

    from finn_flow import build

    marker = tmp_path / "code_ran"
    ckpt = tmp_path / "harmful.pth"
    torch.save({"state_dict": {}, "meta": {"payload": _TouchOnLoad(marker)}}, ckpt)
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
    assert "lacks keys" in error and "backbone.blocks.0.moe.b2" in error, error
