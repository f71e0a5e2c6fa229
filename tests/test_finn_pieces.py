"""finn_flow/pieces.py: cutting a graph at its single-tensor cuts and stitching it back.

Unit tests on small hand-made ONNX graphs (reference: where a cut can be, worked out by
hand; the stitched graph's output against the original's, executed), and one end-to-end
check that a piece-wise build gives the same design as the whole-graph build.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

pytestmark = pytest.mark.finn

qonnx = pytest.importorskip("qonnx")


def chain_model():
    """x -> R1 -> R2 -> Add(R1, R2) -> R3 -> R4 -> Mul(R4, W) -> R5 -> y.

    W = Neg(w0) is computed from a constant (a constant-only node at the top of the
    graph). R1's output is read by the Add after R2, so R2's output is no cut; the cuts
    are R3 and R4 (the Add output is no Relu; R5's output is the graph output).
    """
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    shape = [1, 4, 8]
    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)  # noqa: E731
    w0 = helper.make_tensor("w0", TensorProto.FLOAT, shape, np.linspace(-1, 1, 32).tolist())
    nodes = [
        helper.make_node("Neg", ["w0"], ["W"], name="neg"),
        helper.make_node("Relu", ["x"], ["r1"], name="R1"),
        helper.make_node("Relu", ["r1"], ["r2"], name="R2"),
        helper.make_node("Add", ["r1", "r2"], ["s"], name="add"),
        helper.make_node("Relu", ["s"], ["r3"], name="R3"),
        helper.make_node("Relu", ["r3"], ["r4"], name="R4"),
        helper.make_node("Mul", ["r4", "W"], ["m"], name="mul"),
        helper.make_node("Relu", ["m"], ["y"], name="R5"),
    ]
    graph = helper.make_graph(nodes, "chain", [vi("x")], [vi("y")], [w0])
    model = ModelWrapper(qonnx_make_model(graph))
    from qonnx.transformation.infer_shapes import InferShapes

    return model.transform(InferShapes())


def run(model, x):
    from qonnx.core.onnx_exec import execute_onnx

    return execute_onnx(model, {model.graph.input[0].name: x})[model.graph.output[0].name]


def test_cuts_skip_tensors_that_a_residual_path_bypasses() -> None:
    from finn_flow.pieces import constant_nodes, find_cuts

    model = chain_model()
    assert find_cuts(model, ("Relu",)) == ["r1", "r3", "r4"]
    assert constant_nodes(model) == {0}  # Neg(w0)


@pytest.mark.parametrize("min_nodes", [1, 2, 3, 100])
def test_split_and_stitch_give_the_same_function(min_nodes: int) -> None:
    from finn_flow.pieces import split, stitch

    model = chain_model()
    parts, bounds = split(model, min_nodes, ("Relu",))
    assert len(parts) == len(bounds) + 1
    if min_nodes == 1:
        assert bounds == ["r1", "r3", "r4"]
    if min_nodes == 100:
        assert bounds == []
    for k, part in enumerate(parts):  # each piece reads the previous boundary
        if k:
            assert part.graph.input[0].name == bounds[k - 1]
    # the constant-only Neg goes with its consumer (the Mul), not with the first piece
    holders = [k for k, p in enumerate(parts) if any(n.op_type == "Neg" for n in p.graph.node)]
    mul_piece = [k for k, p in enumerate(parts) if any(n.op_type == "Mul" for n in p.graph.node)]
    assert holders == mul_piece
    x = np.random.default_rng(0).standard_normal((1, 4, 8)).astype(np.float32)
    want = np.maximum(-np.linspace(-1, 1, 32).reshape(1, 4, 8) * np.maximum(
        np.maximum(x, 0) * 2, 0), 0)  # fmt: skip
    stitched = stitch(parts, bounds, ("x", "y"))
    np.testing.assert_allclose(run(model, x), want, rtol=1e-6)
    np.testing.assert_array_equal(run(stitched, x), run(model, x))
    assert sorted(n.name for n in stitched.graph.node) == sorted(n.name for n in model.graph.node)


ONE_BLOCK = """
_base_ = [{base!r}]
model = dict(
    backbone=dict(
        img_size=(8, 8), patch_size=4, embed_dims=16, num_layers=1, num_heads=1,
        moe_layers=[0], num_experts=4, top_k=2, expert_hidden_dims=8,
    ),
    decode_heads=dict(normals=dict(channels=8, num_up=0)),
)
fpga = dict(input_size=(8, 8), calib_images=2, target_fps=10000, val_images=2)
"""


@pytest.mark.slow
def test_piecewise_build_equals_whole_graph_build(tmp_path: Path) -> None:
    from finn_flow import build

    base = Path(__file__).resolve().parents[1] / "configs" / "fpga"
    cfg = tmp_path / "one_block.py"
    base_cfg = base / "m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"
    cfg.write_text(ONE_BLOCK.format(base=str(base_cfg)))
    common = ["--task", "normals", "--config", str(cfg)]
    assert build.main(common + ["--out", str(tmp_path / "whole"), "--jobs", "0"]) == 0
    assert build.main(common + ["--out", str(tmp_path / "split"), "--piece-nodes", "20"]) == 0
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    split = json.loads((tmp_path / "split" / "summary.json").read_text())
    assert whole["pieces"]["steps"] == {}  # --jobs 0: nothing was cut
    steps = split["pieces"]["steps"]
    for name in ("step_m3vit_qonnx_to_finn", "step_m3vit_streamline"):
        assert steps[name]["pieces"] >= 2, steps  # attention half | MoE half (+ head)
    assert split["resources"]["total"] == whole["resources"]["total"]
    layers = lambda s: sorted(  # noqa: E731
        (x["op_type"], x["cycles"], x["LUT"], x["BRAM_18K"]) for x in s["resources"]["layers"]
    )
    assert layers(split) == layers(whole)
    for a, b in zip(split["verification"], whole["verification"], strict=True):
        assert a["max_abs_error"] == b["max_abs_error"]
        assert a["mean_abs_error"] == pytest.approx(b["mean_abs_error"], rel=1e-9)
    assert "pieces cut at the residual stream" in (tmp_path / "split" / "SUMMARY.md").read_text()
