"""The tiny FINN build with the reordered MoE engine, non-zero biases, codegen and C-sim.

A checkpoint of the tiny config with every bias, LayerNorm gain and expert bias set to
non-zero values (so the pre-activation thresholds differ per channel and the gate x b2
term is non-zero) is built with ``--mode codegen``; the stand-in is swapped for the engine
after a bit-exact check on the build's input, the design reaches HLS code, and
``finn_flow/moe_ops/csim.py`` compiles and runs every MoE node's generated top against
its oracle and the cycle model. A deliberately wrong engine is refused by the swap check.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.finn, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FPGA_CONFIG = REPO / "configs" / "fpga" / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
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
def reordered_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmseg.registry import MODELS

    import mmseg_m3vit  # noqa: F401
    from finn_flow import build

    root = tmp_path_factory.mktemp("moe_build")
    cfg_path = root / "tiny.py"
    cfg_path.write_text(TINY)
    cfg = Config.fromfile(str(cfg_path))
    init_default_scope("mmseg")
    torch.manual_seed(0)
    model = MODELS.build(cfg.model)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("bias", ".b1", ".b2")):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.2)
    moe = model.backbone.blocks[0].moe
    assert moe.b1.abs().min() > 0 and moe.b2.abs().min() > 0
    ckpt = root / "biased.pth"
    state = {k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save({"state_dict": state, "meta": {}}, ckpt)
    out = root / "build"
    rc = build.main(["--task", "normals", "--config", str(cfg_path), "--out", str(out),
                     "--mode", "codegen", "--checkpoint", str(ckpt)])  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert rc == 0, summary.get("error")
    return out


def test_engine_replaces_the_standin(reordered_build: Path) -> None:
    from finn_flow.moe_ops.step import load_reports

    reports = load_reports(reordered_build / "finn")
    assert len(reports) == 1
    r = reports[0]
    assert r["swap_check"]["identical"] and r["swap_check"]["inputs"] >= 1
    assert (r["experts"], r["top_k"], r["tokens"], r["dim"], r["hidden"]) == (4, 2, 5, 16, 8)
    assert r["cycles"]["max"] <= r["cycles"]["worst_case"]
    assert 0 < r["expert_ddr_bytes_per_frame"]["max"] <= r["expert_ddr_bytes_per_frame"]["worst"]
    summary = json.loads((reordered_build / "summary.json").read_text())
    assert "step_m3vit_moe_reordered" in summary["steps"]
    layers = {layer["op_type"] for layer in summary["resources"]["layers"]}
    assert {"TopKGate_hls", "ExpertDispatch_hls", "ExpertFFN_hls", "ExpertCombine_hls"} <= layers
    # the stand-in's comparison network (an E -> E*E MVAU) is gone from the design
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    import finn_flow.moe_ops  # noqa: F401

    hw = ModelWrapper(
        str(reordered_build / "finn" / "intermediate_models" / "step_m3vit_verify_hw.onnx")
    )
    for node in hw.graph.node:
        if node.op_type == "MVAU":
            inst = getCustomOp(node)
            assert inst.get_nodeattr("MH") != inst.get_nodeattr("MW") ** 2, node.name


def test_csim_of_the_generated_design(reordered_build: Path) -> None:
    import shutil

    if shutil.which("g++") is None:
        pytest.skip("g++ is not installed: the C-simulation needs a C++ compiler")
    from finn_flow.moe_ops import csim

    assert csim.main(["--build", str(reordered_build)]) == 0
    rep = json.loads((reordered_build / "csim" / "csim_report.json").read_text())
    assert rep["all_match"] and len(rep["nodes"]) == 4
    # by default: input.npy and every verification image the build wrote
    n_verify = len(np.load(reordered_build / "verify_input.npy"))
    assert n_verify >= 1 and rep["inputs"] == 1 + n_verify
    assert all(len(n["runs"]) == rep["inputs"] for n in rep["nodes"])
    ffn = next(n for n in rep["nodes"] if n["op_type"] == "ExpertFFN_hls")
    ev = ffn["runs"][0]["events_kernel"]
    assert sum(ev["load"].values()) > 0 and sum(ev["compute"].values()) > 0


def test_swap_check_refuses_a_wrong_engine(reordered_build: Path, monkeypatch) -> None:
    from qonnx.core.modelwrapper import ModelWrapper

    from finn_flow.moe_ops import MoESwapError, replace_moe_standins
    from finn_flow.moe_ops.combine import ExpertCombine

    streamlined = (
        reordered_build / "finn" / "intermediate_models" / "step_m3vit_verify_streamlined.onnx"
    )

    def fresh() -> ModelWrapper:  # the swap edits the graph in place
        return ModelWrapper(str(streamlined))

    x = np.load(reordered_build / "input.npy")
    _, reports = replace_moe_standins(fresh(), [x])  # the unmodified swap
    assert reports[0]["swap_check"]["identical"]
    original = ExpertCombine.execute_node

    def off_by_one_lsb(self, context, graph):
        original(self, context, graph)
        y = context[self.onnx_node.output[0]]
        context[self.onnx_node.output[0]] = np.nextafter(y, np.float32(np.inf)).astype(np.float32)

    monkeypatch.setattr(ExpertCombine, "execute_node", off_by_one_lsb)
    with pytest.raises(MoESwapError, match="output .* differs"):
        replace_moe_standins(fresh(), [x])
    with pytest.raises(MoESwapError, match="expected 2"):
        replace_moe_standins(fresh(), [x], expected_layers=2)
