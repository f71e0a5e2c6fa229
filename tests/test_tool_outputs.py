"""What the tools show a person: prediction panels, routing tables, the quiet log."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from mmseg_m3vit.engine.runner import HOOK_TABLE, QuietConsoleFilter
from mmseg_m3vit.utils.routing import routing_k, routing_summary
from mmseg_m3vit.utils.visualization import (
    _class_key,
    normals_angular_error,
    prediction_panel,
)


def test_normals_angular_error_closed_form() -> None:
    angles = np.array([0.0, 30.0, 90.0, 135.0])
    rad = np.radians(angles)
    gt = np.zeros((3, 1, 5))
    gt[0, 0, :4] = 1.0  # the last pixel has no ground truth
    pred = np.zeros((3, 1, 5))
    pred[0, 0, :4], pred[1, 0, :4] = 2 * np.cos(rad), 2 * np.sin(rad)  # length 2
    pred[2, 0, 4] = 1.0
    err = normals_angular_error(pred, gt)
    assert err.shape == (1, 5)
    np.testing.assert_allclose(err[0, :4], angles, atol=1e-9)
    assert np.isnan(err[0, 4])


def test_class_key_lists_present_classes_with_names() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    pred = np.array([[[0, 0, 2, 255]]])
    gt = np.array([[[0, 5, 5, 5]]])
    _class_key(ax, [pred, gt], ["wall", "floor", "cabinet", "bed", "chair", "sofa"])
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    plt.close(fig)
    assert labels == ["0 wall", "2 cabinet", "5 sofa"]  # by id; 255 (ignore) left out


def test_panel_grows_a_key_row_for_labels_and_normals() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)
    normals = rng.normal(size=(3, 32, 40))
    preds = {"depth": rng.uniform(1, 3, (1, 32, 40)), "normals": normals}
    gts = {"depth": rng.uniform(1, 3, (1, 32, 40)), "normals": -normals}
    two_rows = prediction_panel(image, {"depth": preds["depth"]}, {"depth": gts["depth"]})
    three_rows = prediction_panel(image, preds, gts)
    assert two_rows.dtype == np.uint8 and two_rows.shape[2] == 3
    assert three_rows.shape[0] > two_rows.shape[0] * 1.3  # the normals error row


def test_routing_summary_explains_its_columns() -> None:
    load = {
        "semseg": np.array([[0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 0.0, 0.0]]),
        "depth": np.array([[2.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]]),
    }
    assert routing_k(load) == 2
    text = routing_summary(load, moe_blocks=[1, 3])
    lines = text.splitlines()
    assert "E = 4 experts, top-k = 2 per token" in lines[0]
    rows = {(ln.split()[0], ln.split()[2]): ln.split()[3:] for ln in lines[3:7]}
    # used, busiest expert, its share, entropy of the shares in bits
    assert rows[("semseg", "1")] == ["4/4", "0", "0.500", "2.00"]
    assert rows[("semseg", "3")] == ["2/4", "0", "1.000", "1.00"]
    assert rows[("depth", "1")] == ["1/4", "0", "2.000", "0.00"]
    assert "k/E = 0.500" in text and "log2 E = 2.00" in text
    with pytest.raises(ValueError, match="sum to k"):
        routing_k({"semseg": np.array([[1.0, 0.5]])})


def test_quiet_console_filter() -> None:
    console = logging.StreamHandler()
    console.setLevel(logging.INFO)
    quiet = QuietConsoleFilter(console)

    def record(msg: str, level: int = logging.INFO) -> logging.LogRecord:
        return logging.LogRecord("mmengine", level, __file__, 1, msg, None, None)

    table = record(f"{HOOK_TABLE}:\nbefore_run: ...")
    assert not quiet.filter(table) and table.levelno == logging.DEBUG
    assert not quiet.filter(record("Config:\nmodel = dict()"))
    assert not quiet.filter(record("\n" + "-" * 60 + "\nSystem environment:\n    sys.platform"))
    assert not quiet.filter(record('"FileClient" will be deprecated in future. Please use'))
    assert quiet.filter(record("Iter(train) [ 25/600]  lr: 1e-02"))
    console.setLevel(logging.DEBUG)
    assert quiet.filter(record(f"{HOOK_TABLE}:\n...")) and quiet.filter(record("Config:\nx"))
