"""SharedThresholdTable: per-channel threshold rows that are integer shifts of one row
become an integer bias + one shared row, with the same outputs as a naive count."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.finn


def _mt_graph(
    thresholds: np.ndarray,
    idt: str = "INT16",
    layout: str = "NWC",
    out_dtype: str = "INT4",
    out_bias: float = -7.0,
):
    """x (1, 6, C) integer -> MultiThreshold(thresholds) -> (1, 6, C)."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.basic import qonnx_make_model

    c = thresholds.shape[0]
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, c])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, c])
    node = helper.make_node(
        "MultiThreshold",
        ["x", "thr"],
        ["y"],
        domain="qonnx.custom_op.general",
        out_dtype=out_dtype,
        out_bias=out_bias,
        data_layout=layout,
    )
    model = ModelWrapper(qonnx_make_model(helper.make_graph([node], "g", [inp], [out])))
    model.set_tensor_datatype("x", DataType[idt])
    model.set_initializer("thr", thresholds.astype(np.float32))
    return model.transform(InferShapes()).transform(InferDataTypes())


def _naive(x: np.ndarray, thresholds: np.ndarray, bias: float) -> np.ndarray:
    """Per element: bias + number of the channel's thresholds <= x (a plain loop)."""
    y = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        row = thresholds[idx[-1]]
        y[idx] = bias + sum(1 for t in row if x[idx] >= t)
    return y


def _run(model, x: np.ndarray) -> np.ndarray:
    from qonnx.core.onnx_exec import execute_onnx

    return execute_onnx(model, {"x": x.astype(np.float32)})["y"]


def test_integer_shifted_rows_become_bias_plus_one_row() -> None:
    from finn_flow.transforms import SharedThresholdTable

    rng = np.random.default_rng(0)
    row = np.sort(rng.uniform(-400, 400, size=15)) + 0.25  # non-integer thresholds
    shifts = rng.integers(-300, 300, size=8)
    shifts[0] = 0
    thr = row[None, :] + shifts[:, None]
    model = _mt_graph(thr)
    pass_ = SharedThresholdTable()
    new = model.transform(pass_)
    assert pass_.rewritten == [("y", 8, 0)]
    assert [n.op_type for n in new.graph.node] == ["Add", "MultiThreshold"]
    assert new.get_initializer(new.graph.node[1].input[1]).shape == (1, 15)
    const = new.get_initializer(new.graph.node[0].input[1])
    assert new.get_tensor_datatype(new.graph.node[0].input[1]).is_integer()
    np.testing.assert_array_equal(const, -(np.ceil(thr[:, 0]) - np.ceil(thr[0, 0])))
    # every integer around every threshold, and random values of the input range
    hits = np.ceil(thr).reshape(-1)
    values = np.concatenate([hits - 1, hits, hits + 1, rng.integers(-800, 800, 200)])
    for _ in range(20):
        x = rng.choice(values, size=(1, 6, 8))
        want = _naive(x, thr, -7.0)
        np.testing.assert_array_equal(_run(model, x), want)
        np.testing.assert_array_equal(_run(new, x), want)


def test_rows_that_are_not_integer_shifts_stay_per_channel() -> None:
    from finn_flow.transforms import SharedThresholdTable

    row = np.arange(15, dtype=np.float64) * 10
    thr = np.stack([row, row + 3, row * 1.5])  # third row: scaled, not shifted
    model = _mt_graph(thr)
    pass_ = SharedThresholdTable()
    new = model.transform(pass_)
    assert pass_.rewritten == []
    assert [n.op_type for n in new.graph.node] == ["MultiThreshold"]
    assert new.get_initializer("thr").shape == (3, 15)


def test_float_input_is_left_alone() -> None:
    """On a float input a shift by ceil()ed thresholds would not be exact: untouched."""
    from finn_flow.transforms import SharedThresholdTable

    row = np.arange(15, dtype=np.float64)
    model = _mt_graph(np.stack([row, row + 2]), idt="FLOAT32")
    pass_ = SharedThresholdTable()
    model.transform(pass_)
    assert pass_.rewritten == []


def test_identical_rows_need_no_bias() -> None:
    from finn_flow.transforms import SharedThresholdTable

    row = np.arange(15, dtype=np.float64) * 3 - 20.5
    model = _mt_graph(np.stack([row] * 4))
    pass_ = SharedThresholdTable()
    new = model.transform(pass_)
    assert len(pass_.rewritten) == 1
    assert [n.op_type for n in new.graph.node] == ["MultiThreshold"]
    x = np.arange(-30, 30, dtype=np.float64)[:24].reshape(1, 6, 4)
    np.testing.assert_array_equal(_run(new, x), _naive(x, np.stack([row] * 4), -7.0))


def test_float32_noise_near_integers_is_snapped_to_the_majority() -> None:
    """Rows that are integer shifts up to float32 noise: where a threshold sits on an
    integer, noise puts ceil() on either side in different channels. Snapping takes the
    majority, counts the moved entries, and the rewritten layer equals the snapped
    per-channel thresholds exactly (and differs from the noisy ones only at those
    thresholds)."""
    from finn_flow.transforms import SharedThresholdTable, shared_row_and_shifts

    rng = np.random.default_rng(1)
    row = np.arange(15, dtype=np.float64) * 161.37 - 1200.0  # row[0] lies on an integer
    shifts = rng.integers(-300, 300, size=6)
    noise = rng.uniform(-2e-3, 2e-3, size=(6, 15))
    thr = row[None, :] + shifts[:, None] + noise
    thr[:, 0] = row[0] + shifts + np.array([1, -1, -1, -1, 1, -1]) * 1e-3  # on an integer
    split = shared_row_and_shifts(thr.astype(np.float32))
    assert split is not None
    np.testing.assert_array_equal(split.shifts, shifts - shifts[0])
    col = np.ceil(thr[:, 0] - shifts).astype(int)  # 4 channels at -1200, 2 at -1199
    assert sorted(col.tolist()) == [-1200] * 4 + [-1199] * 2
    assert split.row[0] == -1200 + shifts[0]  # the majority (row is channel 0's)
    assert split.snapped >= 2
    snapped = split.per_channel
    model = _mt_graph(snapped)
    new = model.transform(SharedThresholdTable())
    x = rng.integers(-2000, 2000, size=(1, 6, 6)).astype(np.float64)
    x[0, 0] = snapped[:, 0]  # right on the snapped thresholds
    np.testing.assert_array_equal(_run(new, x), _naive(x, snapped, -7.0))
    # noisy vs snapped: different only where x sits on a moved threshold
    diff = _naive(x, thr, -7.0) != _naive(x, snapped, -7.0)
    assert diff.sum() <= split.snapped


def test_snap_mode_keeps_one_row_per_channel() -> None:
    from finn_flow.transforms import SharedThresholdTable

    row = np.arange(15, dtype=np.float64) * 7.5 + 0.5
    thr = np.stack([row, row + 3, row - 11])
    pass_ = SharedThresholdTable(rewrite=False)
    new = _mt_graph(thr).transform(pass_)
    assert [n.op_type for n in new.graph.node] == ["MultiThreshold"]
    got = new.get_initializer(new.graph.node[0].input[1])
    np.testing.assert_array_equal(got, np.ceil(thr))
    assert pass_.rewritten == [("y", 3, 0)]


def test_single_threshold_rows_are_left_alone() -> None:
    """Comparators with one threshold per channel gain nothing from a shared table."""
    from finn_flow.transforms import SharedThresholdTable

    pass_ = SharedThresholdTable()
    new = _mt_graph(np.array([[0.5], [3.5], [-2.5]])).transform(pass_)
    assert pass_.rewritten == [] and len(new.graph.node) == 1


@pytest.mark.parametrize(
    ("annotated", "bias", "steps", "expected"),
    [
        ("BIPOLAR", 0.0, 1, "UINT2"),  # a bipolar quantizer whose 2y - 1 was moved out
        ("INT2", 0.0, 3, "UINT2"),  # emits 0..3
        ("INT2", -3.0, 7, "INT4"),  # emits -3..4
        ("INT4", -7.0, 14, "INT4"),  # -7..7 fits: unchanged
        ("BIPOLAR", -1.0, 1, "INT2"),  # out_scale 1 emits -1..0, not -1 / +1
    ],
)
def test_threshold_outputs_are_typed_by_the_range_they_emit(
    annotated: str, bias: float, steps: int, expected: str
) -> None:
    """The annotation after the pass holds out_bias + 0..T (a naive count of the
    thresholds, executed); the execution itself is unchanged."""
    from qonnx.core.datatype import DataType
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.transforms import MultiThresholdOutputTypes

    thresholds = np.sort(np.random.default_rng(steps).integers(-20, 20, (3, steps)), axis=1)
    model = _mt_graph(thresholds.astype(np.float64), out_dtype=annotated, out_bias=bias)
    model.set_tensor_datatype("y", DataType[annotated])
    x = np.random.default_rng(1).integers(-25, 25, (1, 6, 3))
    before = _run(model, x)
    new = model.transform(MultiThresholdOutputTypes())
    after = _run(new, x)
    assert np.array_equal(before, after)
    assert np.array_equal(after, _naive(x, thresholds, bias))
    dtype = new.get_tensor_datatype("y")
    assert dtype.name == expected
    assert getCustomOp(new.graph.node[0]).get_nodeattr("out_dtype") == expected
    assert dtype.allowed(bias) and dtype.allowed(bias + steps)


def test_topk_gate_keeps_k_experts_after_the_hw_conversion(tmp_path) -> None:
    """The stand-in's top-k gate (Brevitas), exported and taken through this flow's
    QONNX-to-FINN, streamlining and HW-layer passes: the HW graph's gates equal the
    Brevitas gates, and exactly k experts per token are kept (a plain loop's top-k)."""
    import torch
    from brevitas.export import export_qonnx

    from finn_flow.finn_env import start_finn
    from finn_flow.quant_model import QuantTopKGate

    start_finn(tmp_path / "finn")
    from finn.builder.build_dataflow_config import DataflowBuildConfig
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx

    from finn_flow import graph_passes
    from finn_flow.steps import non_hw_nodes

    cfg = DataflowBuildConfig(
        output_dir=str(tmp_path / "build"),
        synth_clk_period_ns=5.0,
        generate_outputs=[],
        standalone_thresholds=True,
    )
    for e, k in [(4, 2), (16, 2)]:
        torch.manual_seed(e)
        gate = QuantTopKGate(e, k, prob_bits=8).eval()
        p = torch.softmax(torch.randn(1, 32, e) * 2, dim=-1)
        with torch.no_grad():
            expected = gate(p).numpy()
        path = tmp_path / f"gate{e}.onnx"
        export_qonnx(gate, args=p, export_path=str(path), opset_version=17)
        model = ModelWrapper(str(path))
        for step in (graph_passes.qonnx_to_finn, graph_passes.streamline):
            model = step(model, cfg)
        model = graph_passes.convert_to_hw(model, cfg)
        assert non_hw_nodes(model) == []
        name_in, name_out = model.graph.input[0].name, model.graph.output[0].name
        gates = execute_onnx(model, {name_in: p.numpy()})[name_out]
        assert np.array_equal(gates, expected)
        levels = np.round(p.numpy()[0] * 255)
        for n in range(32):
            order = sorted(range(e), key=lambda j: (-levels[n, j], j))
            kept = set(order[:k])
            assert {j for j in range(e) if gates[0, n, j] > 0} <= kept
            assert np.count_nonzero(gates[0, n]) == sum(levels[n, j] > 0 for j in kept)


def _scale_bias_graph(scale: float, bias: np.ndarray, consumers: int = 1):
    """acc (1, 6, C) INT20 -> Mul(scale) -> Add(bias) -> y (+ a second reader of the Mul)."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.basic import qonnx_make_model

    c = bias.size
    nodes = [
        helper.make_node("Mul", ["acc", "s"], ["m"]),
        helper.make_node("Add", ["m", "b"], ["y"]),
    ]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, c])]
    if consumers > 1:
        nodes.append(helper.make_node("Relu", ["m"], ["z"]))
        outs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 6, c]))
    inp = helper.make_tensor_value_info("acc", TensorProto.FLOAT, [1, 6, c])
    model = ModelWrapper(qonnx_make_model(helper.make_graph(nodes, "g", [inp], outs)))
    model.set_tensor_datatype("acc", DataType["INT20"])
    model.set_initializer("s", np.array(scale, dtype=np.float32))
    model.set_initializer("b", bias.astype(np.float32))
    return model.transform(InferShapes()).transform(InferDataTypes())


def test_bias_on_the_grid_moves_before_the_scale() -> None:
    from qonnx.core.onnx_exec import execute_onnx

    from finn_flow.transforms import IntegerBiasBeforeScale

    rng = np.random.default_rng(2)
    s = 3.4279824e-06
    n = rng.integers(-40000, 40000, size=12)
    model = _scale_bias_graph(s, (n * np.float64(s)).astype(np.float32))
    move = IntegerBiasBeforeScale()
    new = model.transform(move)
    assert move.moved == ["y"]
    assert [x.op_type for x in new.graph.node] == ["Add", "Mul"]
    add = new.graph.node[0]
    np.testing.assert_array_equal(new.get_initializer(add.input[1]), n)
    assert new.get_tensor_datatype(add.input[1]).is_integer()
    x = rng.integers(-(2**19), 2**19, size=(1, 6, 12)).astype(np.float32)
    ref = (x.astype(np.float64) + n) * s  # exact real value
    got = execute_onnx(new, {"acc": x})["y"]
    old = execute_onnx(model, {"acc": x})["y"]
    np.testing.assert_allclose(got, ref, rtol=2e-7, atol=0)
    np.testing.assert_allclose(old, ref, rtol=2e-6, atol=1e-9)


def test_bias_off_the_grid_or_shared_scale_is_left_alone() -> None:
    from finn_flow.transforms import IntegerBiasBeforeScale

    s = 0.01
    off = _scale_bias_graph(s, np.array([0.015, 0.02, 0.03]))  # 1.5 steps: not integer
    move = IntegerBiasBeforeScale()
    off.transform(move)
    assert move.moved == []
    shared = _scale_bias_graph(s, np.array([0.01, 0.02, 0.03]), consumers=2)
    move = IntegerBiasBeforeScale()
    shared.transform(move)
    assert move.moved == []


def _mt_chain(specs: list[tuple[float, float]]):
    """x (1, 6, 4) INT8 -> MultiThreshold (out_scale, out_bias) -> ... -> y, one node per
    spec; every threshold table is one sorted row per channel."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.basic import qonnx_make_model

    rng = np.random.default_rng(5)
    nodes, names = [], ["x"] + [f"t{i}" for i in range(len(specs) - 1)] + ["y"]
    for i, (scale, bias) in enumerate(specs):
        nodes.append(
            helper.make_node(
                "MultiThreshold",
                [names[i], f"thr{i}"],
                [names[i + 1]],
                domain="qonnx.custom_op.general",
                out_dtype="UINT4",
                out_scale=scale,
                out_bias=bias,
                data_layout="NWC",
            )  # fmt: skip
        )
    inp = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 4])
    out = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 4])
    model = ModelWrapper(qonnx_make_model(helper.make_graph(nodes, "g", [inp], [out])))
    model.set_tensor_datatype("x", DataType["INT8"])
    for i in range(len(specs)):
        thr = np.sort(rng.uniform(-60, 60, size=(4, 15)), axis=1)
        model.set_initializer(f"thr{i}", thr.astype(np.float32))
    return model.transform(InferShapes()).transform(InferDataTypes())


def test_one_pass_scale_bias_extraction_equals_finns() -> None:
    """The one-pass extraction gives finn-plus's graph: same op sequence, same constants,
    same outputs, every MultiThreshold left with scale 1 and bias 0."""
    from finn.transformation.streamline.extract_multithreshold_scale_bias import (
        ExtractMultiThresholdScaleBias,
    )
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.transforms import ExtractMultiThresholdScaleBiasOnce

    specs = [(0.5, -3.0), (1.0, 0.0), (2.0, 0.0), (1.0, -8.0), (0.25, 1.5)]
    ref = _mt_chain(specs).transform(ExtractMultiThresholdScaleBias())
    got = _mt_chain(specs).transform(ExtractMultiThresholdScaleBiasOnce())
    assert [n.op_type for n in got.graph.node] == [n.op_type for n in ref.graph.node]
    assert [n.op_type for n in got.graph.node].count("Mul") == 3
    assert [n.op_type for n in got.graph.node].count("Add") == 3
    for a, b in zip(got.graph.node, ref.graph.node, strict=True):
        if a.op_type == "MultiThreshold":
            inst = getCustomOp(a)
            assert (inst.get_nodeattr("out_scale"), inst.get_nodeattr("out_bias")) == (1.0, 0.0)
        for ia, ib in zip(a.input[1:], b.input[1:], strict=True):
            np.testing.assert_array_equal(got.get_initializer(ia), ref.get_initializer(ib))
    x = np.random.default_rng(6).integers(-128, 128, size=(1, 6, 4)).astype(np.float32)
    want = execute_onnx(_mt_chain(specs), {"x": x})["y"]
    np.testing.assert_array_equal(execute_onnx(got, {"x": x})["y"], want)
    np.testing.assert_array_equal(execute_onnx(ref, {"x": x})["y"], want)
