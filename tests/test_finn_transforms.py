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
