"""The thresholding cost model against what finn-plus's RTL generator actually writes.

Each case builds one ``MultiThreshold`` node, lets finn-plus turn it into a
``Thresholding_rtl`` layer for the ZCU104 part and generate its Verilog; the reference is
the generated files themselves: ``C``, ``PE``, ``N`` and ``WT`` parsed from the top-level
``.v`` and the threshold entries counted line by line in the ``.dat`` memory images.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.finn

PART = "xczu7ev-ffvc1156-2-e"


def _generated_thresholding(
    tmp_path: Path, thresholds: np.ndarray, channels: int, pe: int, idt: str
) -> tuple[object, object]:
    """(model, node) of one Thresholding_rtl layer whose HDL has been generated."""
    from onnx import TensorProto, helper
    from qonnx.core.datatype import DataType
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes
    from qonnx.util.basic import qonnx_make_model

    from finn_flow.finn_env import start_finn

    start_finn(tmp_path / "finn")
    from finn.transformation.fpgadataflow.convert_to_hw.thresholding import InferThresholdingLayer
    from finn.transformation.fpgadataflow.minimize_weight_bit_width import (
        MinimizeWeightBitWidth,
    )
    from finn.transformation.fpgadataflow.specialize_layers import SpecializeLayers
    from finn.transformation.streamline.round_thresholds import RoundAndClipThresholds

    steps = thresholds.shape[1]
    out_bits = math.ceil(math.log2(steps + 1))
    inp = helper.make_tensor_value_info("inp", TensorProto.FLOAT, [1, 5, channels])
    out = helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, 5, channels])
    mt = helper.make_node(
        "MultiThreshold",
        ["inp", "thr"],
        ["out"],
        domain="qonnx.custom_op.general",
        out_dtype=f"UINT{out_bits}",
        data_layout="NWC",
    )
    graph = helper.make_graph([mt], "thr", [inp], [out])
    model = ModelWrapper(qonnx_make_model(graph, producer_name="test"))
    model.set_tensor_datatype("inp", DataType[idt])
    model.set_initializer("thr", thresholds.astype(np.float32))
    model = model.transform(InferShapes()).transform(InferDataTypes())
    model = model.transform(RoundAndClipThresholds())  # integer thresholds, as streamlining
    model = model.transform(InferThresholdingLayer())
    model = model.transform(SpecializeLayers(PART))
    node = model.graph.node[0]
    assert node.op_type == "Thresholding_rtl"
    inst = getCustomOp(node)
    inst.set_nodeattr("PE", pe)
    model = model.transform(MinimizeWeightBitWidth())  # integer threshold type, as the build
    node = model.graph.node[0]
    inst = getCustomOp(node)
    gen = tmp_path / "gen"
    gen.mkdir()
    inst.set_nodeattr("code_gen_dir_ipgen", str(gen))
    inst.generate_hdl(model, PART, 5.0)
    return model, node


def _parse_v(folder: Path) -> dict[str, int]:
    text = next(folder.glob("*.v")).read_text()
    found = {}
    for key in ("C", "PE", "N", "WT"):
        m = re.search(rf"parameter\s+{key}\s*=\s*(\d+)", text)
        assert m, f"{key} not in the generated .v"
        found[key] = int(m.group(1))
    return found


def _dat_entries(folder: Path) -> int:
    return sum(len(f.read_text().split()) for f in folder.glob("*_threshs_*.dat"))


@pytest.mark.parametrize(
    ("rows", "channels", "pe", "steps", "idt"),
    [
        (1, 24, 4, 15, "INT12"),  # one shared row: the generator emits C = PE
        (24, 24, 4, 15, "INT12"),  # per-channel rows: C = NumChannels
        (1, 16, 1, 255, "INT20"),  # 8-bit output, shared
        (16, 16, 2, 7, "INT8"),
    ],
)
def test_threshold_table_matches_generated_verilog(
    tmp_path: Path, rows: int, channels: int, pe: int, steps: int, idt: str
) -> None:
    from finn_flow.cost_models import threshold_table, thresholding_rtl_as_generated

    rng = np.random.default_rng(rows * 100 + steps)
    thr = np.sort(rng.integers(-300, 300, size=(rows, steps)), axis=1)
    model, node = _generated_thresholding(tmp_path, thr, channels, pe, idt)
    table = threshold_table(model, node)
    params = _parse_v(tmp_path / "gen")
    assert table.channels == params["C"]
    assert table.pe == params["PE"] == pe
    assert table.steps == params["N"] == steps
    assert table.width == params["WT"]
    assert table.shared == (rows == 1)
    # every threshold entry the RTL stores is one line of a .dat memory image
    assert table.words == _dat_entries(tmp_path / "gen")
    # the closed form: C * (2^M - 1) entries with M = clog2(N + 1)
    m = math.ceil(math.log2(steps + 1))
    assert table.words == params["C"] * (2**m - 1)
    res = thresholding_rtl_as_generated(table)
    assert res["threshold_bits"] == table.words * params["WT"]
    assert res["URAM"] == 0  # no depth trigger: never URAM on this part


def test_shared_table_is_far_cheaper_than_finn_plus_estimate(tmp_path: Path) -> None:
    """A 3072-channel layer with one shared table: finn-plus's estimator charges 3072
    tables; as generated it is PE tables."""
    from qonnx.custom_op.registry import getCustomOp

    from finn_flow.cost_models import threshold_table, thresholding_rtl_as_generated

    thr = np.arange(-127, 128, dtype=np.int64)[None, :] * 3
    model, node = _generated_thresholding(tmp_path, thr, 3072, 4, "INT20")
    table = threshold_table(model, node)
    assert table.channels == 4 and table.words == 4 * 255
    ours = thresholding_rtl_as_generated(table)
    inst = getCustomOp(node)
    finn_mem = inst.bram_estimation(PART) + inst.lut_estimation(PART) + inst.uram_estimation(PART)
    assert finn_mem > 100 * (ours["BRAM_18K"] + ours["URAM"] + 1)
    # the per-stage memories of a shared 8-bit table: depths 1..128 per PE, all LUTRAM
    assert ours["BRAM_18K"] == 0
    width = table.width
    lutram = sum(4 * width * math.ceil(2**s / 64) for s in range(8))
    assert ours["LUT"] == lutram + 4 * 8 * width


def test_ram_style_follows_depth_triggers() -> None:
    """The RTL's rule: URAM at or above the URAM trigger, BRAM at or above the BRAM
    trigger, LUTRAM below it when a BRAM trigger is set, else Vivado's choice."""
    from finn_flow.cost_models import ThresholdTable, thresholding_rtl_as_generated

    t = ThresholdTable(
        channels=64, pe=1, steps=255, stages=8, width=16, depth_trigger_uram=4096,
        depth_trigger_bram=256,
    )  # fmt: skip
    # depths 64 * 2^s: 64, 128 LUTRAM; 256 .. 2048 BRAM; 4096, 8192 URAM
    styles = ["distributed"] * 2 + ["block"] * 4 + ["ultra"] * 2
    assert [t.ram_style(s) for s in range(8)] == styles
    res = thresholding_rtl_as_generated(t)
    assert res["URAM"] == 1 + 2  # 16 x 4096 and 16 x 8192 in 72 x 4096 blocks
    # 16-bit x 256..2048 in the least-waste BRAM_18K shape: 1, 2, 4, 8 blocks (18 x 1024)
    assert res["BRAM_18K"] == 1 + 1 + 1 + 2
    assert res["LUT"] == 16 * (1 + 2) + 8 * 16
