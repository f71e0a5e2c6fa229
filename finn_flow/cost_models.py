"""The project's own resource cost models for HW layers finn-plus estimates as zero.

finn-plus 1.6.1 reports 0 LUT / BRAM / DSP for several layers it can generate code for
(ScaledDotProductAttention, HWSoftmax, float ElementwiseMul/Add, stream replication,
LayerNorm, PWPolyF). Summing its per-layer estimates would then understate the design.
These models are coarse, first-order and documented, not synthesis results; every number
they produce is labelled as ours in the build summary.

Assumptions (per unit of parallelism, "lane" = one element per cycle):
- a float32 adder: 400 LUT, 2 DSP; a float32 multiplier: 150 LUT, 3 DSP
  (typical Vivado floating-point IP, DSP-full configuration);
- a float32 exp or reciprocal: 1,000 LUT, 7 DSP; a float32 divide: 800 LUT, 0 DSP;
- a FIFO/buffer of B bits costs ceil(B / 18,432) BRAM_18K when above 1,024 bits
  (LUTRAM below that, 1 LUT per 32 bits);
- stream replication: 1 LUT per bit of stream width per extra consumer (register fan-out);
- nearest-neighbour upsampling (head): one input row buffered (WI x C x bits, re-read
  HO/HI times) plus 100 LUT of counters; Crop / Reshape: 50 LUT of counters (pure
  stream pass-through).

Thresholding (RTL) is re-estimated as finn-plus *generates* it
(:func:`thresholding_rtl_as_generated`), not as its estimator charges it: the estimator
sizes the table memories for ``NumChannels`` rows even where the code generator emits one
shared row per PE (a threshold tensor with a single row gives ``C = PE`` in the generated
``.v``), and it may place threshold memories in URAM, which the generated RTL only uses
when ``depth_trigger_uram`` asks for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FLOAT_ADD = {"LUT": 400, "DSP": 2}
FLOAT_MUL = {"LUT": 150, "DSP": 3}
FLOAT_EXP = {"LUT": 1000, "DSP": 7}
FLOAT_DIV = {"LUT": 800, "DSP": 0}
BRAM18_BITS = 18432


def buffer_cost(bits: int) -> dict[str, int]:
    """Cost of storing ``bits`` bits: LUTRAM below 1 kbit, else BRAM_18K."""
    if bits <= 1024:
        return {"LUT": math.ceil(bits / 32), "BRAM_18K": 0}
    return {"LUT": 0, "BRAM_18K": math.ceil(bits / BRAM18_BITS)}


def _add(total: dict[str, float], part: dict[str, float], times: float = 1.0) -> None:
    for key, value in part.items():
        total[key] = total.get(key, 0) + value * times


def _attr(inst: Any, name: str, default: Any) -> Any:
    try:
        return inst.get_nodeattr(name)
    except (AttributeError, Exception):  # noqa: BLE001 - attribute absent on this op
        return default


def own_estimate(op_type: str, inst: Any) -> dict[str, float] | None:
    """Estimate one layer's resources, or None when we have no model for ``op_type``.

    Args:
        op_type: the node's op type (with or without the ``_hls``/``_rtl`` suffix).
        inst: the qonnx custom-op instance (``getCustomOp(node)``).

    Returns:
        ``{'LUT', 'FF', 'BRAM_18K', 'URAM', 'DSP'}`` (FF taken as equal to LUT, a common
        ratio for pipelined float datapaths) or None.
    """
    base = op_type.removesuffix("_hls").removesuffix("_rtl")
    total: dict[str, float] = {}
    if base in ("ElementwiseMul", "ElementwiseAdd", "ElementwiseSub"):
        pe = int(_attr(inst, "PE", 1))
        dtypes = [str(_attr(inst, k, "")) for k in ("lhs_dtype", "rhs_dtype", "out_dtype")]
        if not any("FLOAT" in d for d in dtypes):
            return None
        _add(total, FLOAT_MUL if base == "ElementwiseMul" else FLOAT_ADD, pe)
    elif base == "HWSoftmax":
        simd = int(_attr(inst, "SIMD", 1))
        channels = int(_attr(inst, "ifm_dim", [1])[-1]) if _attr(inst, "ifm_dim", None) else 1
        _add(total, FLOAT_EXP, simd)
        _add(total, FLOAT_ADD, simd)
        _add(total, FLOAT_DIV, simd)
        _add(total, buffer_cost(32 * channels))
    elif base == "LayerNorm":
        simd = int(_attr(inst, "SIMD", 1))
        channels = int(_attr(inst, "ifm_dim", [1])[-1])
        _add(total, FLOAT_ADD, 2 * simd)  # mean and variance accumulators
        _add(total, FLOAT_MUL, 2 * simd)  # square, scale
        _add(total, FLOAT_DIV, 1)  # 1/sqrt(var + eps), once per token
        _add(total, buffer_cost(32 * channels))  # token buffer (two passes)
    elif base == "PWPolyF":
        pe = int(_attr(inst, "PE", 1))
        _add(total, FLOAT_MUL, 3 * pe)  # cubic polynomial, Horner form
        _add(total, FLOAT_ADD, 3 * pe)
    elif base == "ScaledDotProductAttention":
        qk_dim = int(_attr(inst, "QKDim", 1))
        v_dim = int(_attr(inst, "VDim", 1))
        kv_len = int(_attr(inst, "KVLen", 1))
        emb_fold = max(int(_attr(inst, "EmbFold", 1)), 1)
        seq_fold = max(int(_attr(inst, "SeqFold", 1)), 1)
        qk_bits = 8  # q, k, v are 8-bit in this flow (QuantSpec.act_bits default)
        # K and V held on chip for the whole frame
        _add(total, buffer_cost(qk_bits * kv_len * qk_dim))
        _add(total, buffer_cost(qk_bits * kv_len * v_dim))
        # integer MACs: (qk_dim / EmbFold) x (kv_len / SeqFold) lanes, 8x8-bit in LUTs
        lanes = max(qk_dim // emb_fold, 1) * max(kv_len // seq_fold, 1)
        _add(total, {"LUT": 40}, lanes * 2)  # q.k and a.v multiply-accumulate
        # softmax over the scores: exp + sum + normalise, one lane per kv element
        _add(total, FLOAT_EXP, max(kv_len // seq_fold, 1))
        _add(total, FLOAT_ADD, 1)
        _add(total, FLOAT_DIV, 1)
    elif base in ("DuplicateStreams", "ReplicateStream"):
        width = 0
        try:
            width = int(inst.get_instream_width())
        except Exception:  # noqa: BLE001 - width unknown before specialisation
            width = 32
        outs = int(_attr(inst, "NumOutputStreams", 2))
        _add(total, {"LUT": width}, max(outs - 1, 1))
    elif base == "UpsampleNearestNeighbour":
        wi = int(_attr(inst, "WI", 1))
        ch = int(_attr(inst, "NumChannels", 1))
        bits = 8
        try:
            bits = int(inst.get_input_datatype().bitwidth())
        except Exception:  # noqa: BLE001 - datatype unknown
            pass
        _add(total, buffer_cost(wi * ch * bits))
        _add(total, {"LUT": 100})
    elif base in ("Crop", "Reshape"):
        _add(total, {"LUT": 50})
    else:
        return None
    lut = total.get("LUT", 0)
    return {
        "LUT": float(lut),
        "FF": float(lut),
        "BRAM_18K": float(total.get("BRAM_18K", 0)),
        "URAM": 0.0,
        "DSP": float(total.get("DSP", 0)),
    }


# --------------------------------------------------------------------------- thresholding
#: Memory primitives of UltraScale+ parts as (width, depth): BRAM_18K in its
#: simple-dual-port / true-dual-port aspect ratios, LUTRAM as 64-deep single-bit RAMs
#: (RAM64X1S). URAM (72 x 4096) only where the RTL asks for it (``ram_style`` ultra).
BRAM18_SHAPES = ((36, 512), (18, 1024), (9, 2048), (4, 4096), (2, 8192), (1, 16384))
URAM_SHAPE = (72, 4096)
LUTRAM_SHAPE = (1, 64)


def _fit(width: int, depth: int, shape: tuple[int, int]) -> tuple[int, int]:
    """(primitives, wasted bits) to hold a width x depth memory in ``shape`` blocks."""
    pw, pd = shape
    count = math.ceil(width / pw) * math.ceil(depth / pd)
    return count, count * pw * pd - width * depth


@dataclass(frozen=True)
class ThresholdTable:
    """What the finn-plus RTL thresholding generator emits for one layer.

    Attributes:
        channels: ``C`` of the generated ``.v``: ``NumChannels``, or ``PE`` when the
            threshold tensor has a single row (one table shared by every channel).
        pe: processing elements (``PE``). steps: thresholds per channel (``N``).
        stages: binary-search stages ``M = clog2(N + 1)``; stage s holds
            ``C / PE * 2^s`` entries per PE.
        width: threshold bits (``WT``).
        depth_trigger_uram / depth_trigger_bram: the node's memory-style triggers.
    """

    channels: int
    pe: int
    steps: int
    stages: int
    width: int
    depth_trigger_uram: int = 0
    depth_trigger_bram: int = 0

    @property
    def shared(self) -> bool:
        """True when one table (per PE) serves every channel."""
        return self.channels == self.pe

    def stage_depth(self, stage: int) -> int:
        """Entries of stage ``stage``'s memory in one PE (as the RTL's ``DEPTH``)."""
        return (self.channels // self.pe) * 2**stage

    @property
    def words(self) -> int:
        """Threshold entries stored over all PEs and stages: ``C * (2^M - 1)``."""
        return sum(self.pe * self.stage_depth(s) for s in range(self.stages))

    @property
    def bits(self) -> int:
        """Stored threshold bits (``words * WT``)."""
        return self.words * self.width

    def ram_style(self, stage: int) -> str:
        """The RTL's ``RAM_STYLE`` for one stage (thresholding.sv's rule)."""
        depth = self.stage_depth(stage)
        if self.depth_trigger_uram and depth >= self.depth_trigger_uram:
            return "ultra"
        if self.depth_trigger_bram and depth >= self.depth_trigger_bram:
            return "block"
        return "distributed" if self.depth_trigger_bram else "auto"


def threshold_table(model: Any, node: Any) -> ThresholdTable:
    """The :class:`ThresholdTable` a ``Thresholding_rtl`` node generates (its ``.v``).

    Mirrors ``Thresholding_rtl.prepare_codegen_rtl_values``: ``C = PE`` when the
    threshold initializer has one row, else ``NumChannels``; ``N = numSteps``; ``WT``
    the threshold datatype's bits.
    """
    from qonnx.custom_op.registry import getCustomOp

    inst = getCustomOp(node)
    pe = int(inst.get_nodeattr("PE"))
    channels = int(inst.get_nodeattr("NumChannels"))
    shape = model.get_tensor_shape(node.input[1])
    if shape is not None and shape[0] == 1:
        channels = pe
    steps = int(inst.get_nodeattr("numSteps"))
    return ThresholdTable(
        channels=channels,
        pe=pe,
        steps=steps,
        stages=max(math.ceil(math.log2(steps + 1)), 1),
        width=int(inst.get_input_datatype(1).bitwidth()),
        depth_trigger_uram=int(inst.get_nodeattr("depth_trigger_uram")),
        depth_trigger_bram=int(inst.get_nodeattr("depth_trigger_bram")),
    )


def thresholding_rtl_as_generated(table: ThresholdTable) -> dict[str, float]:
    """Resources of one RTL thresholding layer as generated (see :class:`ThresholdTable`).

    Memories: each PE has one memory per stage (``WT`` bits x ``stage_depth``); its
    primitive follows the stage's RAM style: ``ultra`` -> URAM, ``block`` -> the BRAM_18K
    aspect ratio with the least waste, ``distributed`` -> LUTRAM, ``auto`` -> whichever of
    BRAM_18K and LUTRAM wastes fewer bits (finn-plus's own rule, ties to BRAM; Vivado's
    actual choice needs synthesis). Logic (finn-plus charges none): per PE and stage one
    ``WT``-bit comparator, taken as ``WT`` LUTs, and as many FFs for its pipeline register.

    Returns:
        ``{'LUT', 'FF', 'BRAM_18K', 'URAM', 'DSP'}`` plus ``'threshold_bits'``.
    """
    res = {"LUT": 0.0, "FF": 0.0, "BRAM_18K": 0.0, "URAM": 0.0, "DSP": 0.0}
    for stage in range(table.stages):
        depth, width = table.stage_depth(stage), table.width
        style = table.ram_style(stage)
        if style == "ultra":
            res["URAM"] += table.pe * _fit(width, depth, URAM_SHAPE)[0]
            continue
        bram = min((_fit(width, depth, s) for s in BRAM18_SHAPES), key=lambda cw: cw[1])
        lutram = _fit(width, depth, LUTRAM_SHAPE)
        if style == "block" or (style == "auto" and bram[1] <= lutram[1]):
            res["BRAM_18K"] += table.pe * bram[0]
        else:
            res["LUT"] += table.pe * lutram[0]
    logic = table.pe * table.stages * table.width
    res["LUT"] += logic
    res["FF"] += logic
    res["threshold_bits"] = float(table.bits)
    return res
