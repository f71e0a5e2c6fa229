"""SharedThresholdTable: per-channel threshold rows that are integer shifts of one row
become an integer bias + one shared row, with the same outputs as a naive count."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.finn


def _mt_graph(thresholds: np.ndarray, idt: str = "INT16", layout: str = "NWC"):
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
        out_dtype="INT4",
        out_bias=-7.0,
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
    row = np.sort(rng.uniform(-400, 400, size=15))  # non-integer thresholds
    shifts = rng.integers(-300, 300, size=8)
    shifts[0] = 0
    thr = row[None, :] + shifts[:, None]
    model = _mt_graph(thr)
    pass_ = SharedThresholdTable()
    new = model.transform(pass_)
    assert pass_.rewritten == [("y", 8)]
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
