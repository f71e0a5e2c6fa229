"""finn_flow.steps: verification over several images and its LSB bound.

A hand-made one-node graph (y = x) is "verified" against expected outputs that differ
from the input by known multiples of the LSB, so the errors per image are known.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

pytestmark = pytest.mark.finn

LSB = 0.25


@pytest.fixture
def setup(tmp_path: Path):
    from finn_flow import start_finn

    start_finn(tmp_path / "env")
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.util.basic import qonnx_make_model

    from finn_flow import steps

    vi = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4])  # noqa: E731
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])], "g", [vi("x")], [vi("y")]
    )
    model = ModelWrapper(qonnx_make_model(graph))
    x = np.random.default_rng(0).standard_normal((3, 1, 4)).astype(np.float32)
    expected = x.copy()
    expected[1, 0, 2] += 1 * LSB
    expected[2, 0, 0] -= 3 * LSB
    np.save(tmp_path / "in.npy", x)
    np.save(tmp_path / "out.npy", expected)

    def cfg(max_lsb):
        return steps.M3ViTBuildConfig(
            output_dir=str(tmp_path / "finn"),
            synth_clk_period_ns=5.0,
            generate_outputs=[],
            verify_input_npy=str(tmp_path / "in.npy"),
            verify_expected_output_npy=str(tmp_path / "out.npy"),
            output_lsb=LSB,
            max_lsb=max_lsb,
        )

    return steps, model, cfg


def test_verify_reports_every_image(setup) -> None:
    steps, model, cfg = setup
    res = steps.verify(model, cfg(3.0), "hw_layers")
    assert res["images"] == 3
    assert res["max_error_lsb_per_image"] == pytest.approx([0.0, 1.0, 3.0], abs=1e-5)
    assert res["max_error_lsb"] == pytest.approx(3.0, abs=1e-5)
    assert res["mean_error_lsb"] == pytest.approx(4.0 / 12, abs=1e-5)
    assert not res["bit_exact"]
    from finn_flow.report import StepRecords

    assert StepRecords.load(cfg(3.0).output_dir).verification == [res]


def test_verify_fails_above_the_bound(setup) -> None:
    from finn_flow import BuildError

    steps, model, cfg = setup
    with pytest.raises(BuildError, match=r"3 LSB .* on image 2 exceeds --max-lsb 2\.5"):
        steps.verify(model, cfg(2.5), "streamlined")
    steps.verify(model, cfg(None), "streamlined")  # no bound: passes
