"""``ExpertFFN``: the expert-by-expert FFN with double-buffered expert weights from DDR.

Per row (token t routed to expert e with gate code g), in the integer domain of the
streamlined quantized model::

    acc1 = x @ w1[e]                                  # (Hd,) integer accumulators
    c1   = #{j : acc1 + b1[e] >= thr1[e][:, j]}      # pre-activation code - ActVal1
    h    = act_lut[c1] * gate_scale_lut[g]            # float32 (activation x gate)
    hid  = #{j : h >= thr_h[j]} + ActValH             # hidden code (the gated hidden)
    out  = (hid @ w2[e], g * b2[e])                   # (D, 2) integers

which is the quantized model's ``fc2(Q(g * GELU(fc1(x)))) + g * b2``, i.e. the gate
multiplies the expert's output, ``g * y`` with ``y = W2 h + b2``. ``ExpertCombine`` sums
the k rows of each token and applies the dequantisation scales.

Weights come from the node's parameter inputs (the numpy oracle) or, in hardware and in
the C-simulation, from the DDR image (:mod:`finn_flow.moe_ops.ddr`): each non-empty
expert's image is read once per frame into one of two on-chip buffers while the other
buffer's expert computes (:mod:`finn_flow.moe_ops.schedule`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from finn.custom_op.fpgadataflow import register_custom_op
from finn.custom_op.fpgadataflow.hls import register_custom_op as register_hls_op
from qonnx.core.datatype import DataType

from finn_flow.moe_ops.base import (
    MoEHLS,
    MoEOp,
    bits_for,
    c_array,
    c_bool,
    decode_routing,
    expert_order,
    memory_cost,
)
from finn_flow.moe_ops.ddr import ExpertLayout, expert_layout
from finn_flow.moe_ops.schedule import expert_counts, ffn_schedule, ffn_worst_case

#: parameter inputs after the two streams, in order
PARAMS = ("w1", "b1", "thr1", "w2", "b2", "thr_h")
#: cycles from issuing an expert's AXI read to its first beat (DDR4 behind the PS at
#: 200 MHz: about 150-300 ns; a modelling constant, stated in docs/fpga.md)
DEFAULT_AXI_LATENCY = 64


def f32_bits(values: Any) -> list[int]:
    """IEEE float32 bit patterns (as Python ints) of ``values``."""
    return [int(b) for b in np.asarray(values, dtype=np.float32).ravel().view(np.uint32)]


def mt_count(v: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """MultiThreshold count: ``#{j : v >= thr[..., j]}``; v (..., C), thr (C or 1, n)."""
    return np.count_nonzero(v[..., None] >= thr, axis=-1)


@register_custom_op
class ExpertFFN(MoEOp):
    """in0 rows (1, T*k, D) + in1 routing (1, T, 2k) + parameters -> out0 (1, T*k, D, 2)."""

    def get_nodeattr_types(self) -> dict:
        """Node attributes (see finn_flow/moe_ops/README.md)."""
        attrs = super().get_nodeattr_types()
        attrs.update(
            {
                "Dim": ("i", True, 0),
                "HiddenDim": ("i", True, 0),
                "PE": ("i", False, 1),
                "SIMD": ("i", False, 1),
                "inputDataType": ("s", True, ""),
                "weightDataType": ("s", True, ""),
                "hiddenDataType": ("s", True, ""),
                "accDataType": ("s", True, ""),
                "AccBits1": ("i", True, 32),
                "ActValH": ("i", False, 0),
                "act_lut": ("floats", True, []),
                "gate_scale_lut": ("floats", True, []),
                "thr1PerChannel": ("i", False, 0),
                "NumThr1": ("i", True, 0),
                "NumThrH": ("i", True, 0),
                "b1Bits": ("i", True, 2),
                "thr1Bits": ("i", True, 2),
                "b2Bits": ("i", True, 2),
                "axi_bits": ("i", False, 128),
                "axi_latency": ("i", False, DEFAULT_AXI_LATENCY),
                "ram_style": ("s", False, "auto", {"auto", "block", "ultra"}),
                "resType": ("s", False, "dsp", {"dsp", "lut"}),
                "ddr_offset": ("i", False, 0),
            }
        )
        return attrs

    # ------------------------------------------------------------------ sizes
    @property
    def dim(self) -> int:
        """D."""
        return int(self.get_nodeattr("Dim"))

    @property
    def hidden(self) -> int:
        """Hd."""
        return int(self.get_nodeattr("HiddenDim"))

    def _fold(self) -> tuple[int, int]:
        pe, simd = int(self.get_nodeattr("PE")), int(self.get_nodeattr("SIMD"))
        for total in (self.dim, self.hidden):
            self._check_fold(total, pe, "PE")
            self._check_fold(total, simd, "SIMD")
        return pe, simd

    def row_cycles(self) -> int:
        """MAC-array cycles of one row: fc1 (Hd/PE)(D/SIMD) + fc2 (D/PE)(Hd/SIMD)."""
        pe, simd = self._fold()
        return (self.hidden // pe) * (self.dim // simd) + (self.dim // pe) * (self.hidden // simd)

    def prologue_cycles(self) -> int:
        """Routing read (T), prefix over experts (E), row placement (T*k)."""
        return self.tokens + self.experts + self.tokens * self.top_k

    def expert_layout(self) -> ExpertLayout:
        """Byte layout of one expert image in DDR."""
        d, hd = self.dim, self.hidden
        per_ch = int(self.get_nodeattr("thr1PerChannel"))
        n1 = int(self.get_nodeattr("NumThr1"))
        wb = DataType[self.get_nodeattr("weightDataType")].bitwidth()
        counts = {"w1": d * hd, "b1": hd, "thr1": hd * n1 if per_ch else 0, "w2": d * hd, "b2": d}
        bits = {
            "w1": wb,
            "b1": int(self.get_nodeattr("b1Bits")),
            "thr1": int(self.get_nodeattr("thr1Bits")),
            "w2": wb,
            "b2": int(self.get_nodeattr("b2Bits")),
        }
        return expert_layout(d, hd, counts, bits, int(self.get_nodeattr("axi_bits")))

    def section_types(self) -> dict[str, str]:
        """Element type per DDR section (for the DDR layout JSON)."""
        wdt = self.get_nodeattr("weightDataType")
        return {
            "w1": wdt,
            "b1": f"INT{self.get_nodeattr('b1Bits')}",
            "thr1": f"INT{self.get_nodeattr('thr1Bits')}",
            "w2": wdt,
            "b2": f"INT{self.get_nodeattr('b2Bits')}",
        }

    def expert_bytes(self) -> int:
        """Bytes of one expert image (AXI aligned)."""
        return self.expert_layout().stride

    def onchip_buffer_bytes(self) -> int:
        """Bytes of the two expert buffers (payload, without memory-block rounding)."""
        lay = self.expert_layout()
        return 2 * sum(s.count * s.bits for s in lay.sections) // 8

    # ------------------------------------------------------------------ shapes
    def get_normal_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """Streams: rows (1, T*k, D), routing (1, T, 2k); then the parameter shapes."""
        e, d, hd = self.experts, self.dim, self.hidden
        n1 = int(self.get_nodeattr("NumThr1"))
        per_ch = int(self.get_nodeattr("thr1PerChannel"))
        shapes = [
            (1, self.tokens * self.top_k, d),
            self.routing_shape(),
            (e, d, hd),
            (e, hd),
            (e, hd, n1) if per_ch else (1, 1, n1),
            (e, hd, d),
            (e, d),
            (1, int(self.get_nodeattr("NumThrH"))),
        ]
        return shapes[ind]

    def get_normal_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T*k, D, 2): per row and output channel (fc2 accumulator, gate x b2)."""
        return (1, self.tokens * self.top_k, self.dim, 2)

    def get_folded_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """rows (1, T*k, D/SIMD, SIMD); routing (1, T, 1, 2k); parameters unfolded."""
        pe, simd = self._fold()
        if ind == 0:
            return (1, self.tokens * self.top_k, self.dim // simd, simd)
        if ind == 1:
            return (1, self.tokens, 1, 2 * self.top_k)
        return self.get_normal_input_shape(ind)

    def get_folded_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T*k, D/PE, 2*PE)."""
        pe, _ = self._fold()
        return (1, self.tokens * self.top_k, self.dim // pe, 2 * pe)

    def get_input_datatype(self, ind: int = 0) -> DataType:
        """rows, routing, then the parameter element types."""
        keys = ["inputDataType", "routingDataType", "weightDataType"]
        if ind < 3:
            return DataType[self.get_nodeattr(keys[ind])]
        if ind == 3:
            return DataType[f"INT{self.get_nodeattr('b1Bits')}"]
        if ind == 4:
            return DataType[f"INT{self.get_nodeattr('thr1Bits')}"]
        if ind == 5:
            return DataType[self.get_nodeattr("weightDataType")]
        if ind == 6:
            return DataType[f"INT{self.get_nodeattr('b2Bits')}"]
        return DataType["FLOAT32"]

    def get_output_datatype(self, ind: int = 0) -> DataType:
        """Accumulators."""
        return DataType[self.get_nodeattr("accDataType")]

    def get_instream_width(self, ind: int = 0) -> int:
        """SIMD codes (rows), one routing beat, 0 for the parameter inputs (AXI-MM)."""
        if ind == 0:
            return self._fold()[1] * self.get_input_datatype(0).bitwidth()
        if ind == 1:
            return self.routing_width()
        return 0

    def get_outstream_width(self, ind: int = 0) -> int:
        """PE (fc2 accumulator, gate x b2) pairs per beat."""
        return self._fold()[0] * 2 * self.get_output_datatype().bitwidth()

    def get_verilog_top_module_intf_names(self) -> dict:
        """Two AXI streams in, one out, one AXI-MM master for the expert images."""
        intf = super().get_verilog_top_module_intf_names()
        intf["aximm"] = [("m_axi_gmem0", int(self.get_nodeattr("axi_bits")))]
        intf["axilite"] = ["s_axi_control"]
        return intf

    # ------------------------------------------------------------------ oracle
    def _params(self, context_or_model: Any) -> dict[str, np.ndarray]:
        node = self.onnx_node
        out = {}
        for i, name in enumerate(PARAMS, start=2):
            tname = node.input[i]
            if isinstance(context_or_model, dict):
                val = context_or_model[tname]
            else:
                val = context_or_model.get_initializer(tname)
                if val is None:
                    raise ValueError(f"{node.name}: parameter {name} ({tname}) has no initializer")
            out[name] = np.asarray(val)
        return out

    def execute_node(self, context: dict, graph: Any) -> None:
        """Bit-exact reference (module docstring), expert by expert."""
        node = self.onnx_node
        p = self._params(context)
        d = self.dim
        rows = np.rint(np.asarray(context[node.input[0]])).astype(np.int64).reshape(-1, d)
        ids, gates = decode_routing(context[node.input[1]], self.top_k)
        experts, tokens, slots = expert_order(ids)
        g = gates[tokens, slots]
        w1, b1 = p["w1"].astype(np.int64), p["b1"].astype(np.int64)
        w2, b2 = p["w2"].astype(np.int64), p["b2"].astype(np.int64)
        thr1 = p["thr1"].astype(np.int64)
        thr_h = p["thr_h"].astype(np.float32).reshape(1, -1)
        act = np.asarray(self.get_nodeattr("act_lut"), dtype=np.float32)
        gsl = np.asarray(self.get_nodeattr("gate_scale_lut"), dtype=np.float32)
        act_h = int(self.get_nodeattr("ActValH"))
        out = np.zeros((rows.shape[0], d, 2), dtype=np.int64)
        for e in np.unique(experts):
            sel = experts == e
            acc1 = rows[sel] @ w1[e] + b1[e]
            t1 = thr1[e] if thr1.shape[0] > 1 else thr1[0]
            c1 = mt_count(acc1, t1)
            h = act[c1] * gsl[g[sel]][:, None]  # float32 x float32
            hid = mt_count(h, thr_h) + act_h
            out[sel, :, 0] = hid @ w2[e]
            out[sel, :, 1] = g[sel][:, None] * b2[e][None, :]
        context[node.output[0]] = out.astype(np.float32).reshape(self.get_normal_output_shape())

    def expert_params(self, model: Any) -> dict[str, np.ndarray]:
        """Per-expert arrays in DDR order (see :mod:`finn_flow.moe_ops.ddr`)."""
        p = self._params(model)
        e = self.experts
        w1 = np.rint(p["w1"]).astype(np.int64).transpose(0, 2, 1).reshape(e, -1)
        w2 = np.rint(p["w2"]).astype(np.int64).transpose(0, 2, 1).reshape(e, -1)
        thr1 = np.rint(p["thr1"]).astype(np.int64)
        thr1 = thr1.reshape(e, -1) if int(self.get_nodeattr("thr1PerChannel")) else np.zeros((e, 0))
        return {
            "w1": w1,
            "b1": np.rint(p["b1"]).astype(np.int64).reshape(e, -1),
            "thr1": thr1,
            "w2": w2,
            "b2": np.rint(p["b2"]).astype(np.int64).reshape(e, -1),
        }

    # ------------------------------------------------------------------ cycles
    def _schedule_args(self) -> dict[str, int]:
        lay = self.expert_layout()
        return {
            "load_beats": lay.beats,
            "latency": int(self.get_nodeattr("axi_latency")),
            "row_cycles": self.row_cycles(),
            "prologue": self.prologue_cycles(),
        }

    def schedule(self, routing: np.ndarray) -> Any:
        """:class:`~finn_flow.moe_ops.schedule.FFNSchedule` of one routing (1, T, 2k)."""
        counts = expert_counts(routing, self.experts, self.top_k)
        return ffn_schedule(
            counts, bytes_per_beat=int(self.get_nodeattr("axi_bits")) // 8, **self._schedule_args()
        )

    def cycles_for(self, routing: np.ndarray) -> dict[str, Any]:
        """Double-buffered schedule (cycles) and per-expert load/compute event counts."""
        s = self.schedule(routing)
        ev = {
            "route": self.tokens,
            "prefix": self.experts,
            "place": self.tokens * self.top_k,
            "load": {st.expert: st.load_beats for st in s.steps},
            "compute": {st.expert: st.compute_cycles for st in s.steps},
        }
        return {
            "cycles": s.total_cycles,
            "no_overlap_cycles": s.no_overlap_cycles,
            "load_bytes": s.load_bytes,
            "events": ev,
            "schedule": s,
        }

    def get_exp_cycles(self) -> int:
        """Worst case over all routings (closed form, see schedule.py)."""
        cyc, _ = ffn_worst_case(self.experts, self.tokens * self.top_k, **self._schedule_args())
        return int(cyc)

    def worst_case_load_bytes(self) -> int:
        """DDR bytes per frame when min(E, T*k) experts are non-empty."""
        return min(self.experts, self.tokens * self.top_k) * self.expert_bytes()

    # ------------------------------------------------------------------ resources
    def _memories(self, fpgapart: str) -> list[dict[str, int]]:
        pe, simd = self._fold()
        lay = self.expert_layout()
        style = self.get_nodeattr("ram_style")
        d, hd = self.dim, self.hidden
        wb = lay.section("w1").bits
        # W1 and W2 of both buffers share one simple-dual-port memory, PE*SIMD weights
        # wide: the MAC array reads one word per cycle from one half (fc1 and fc2 of a row
        # run one after the other) while the DMA writes the other half
        words = d * hd // (pe * simd)
        mems = [memory_cost(4 * words, pe * simd * wb, style, fpgapart)]
        n1 = int(self.get_nodeattr("NumThr1"))
        mems.append(memory_cost(2 * hd // pe, pe * lay.section("b1").bits, "block", fpgapart))
        mems.append(memory_cost(2 * d // pe, pe * lay.section("b2").bits, "block", fpgapart))
        if int(self.get_nodeattr("thr1PerChannel")):
            mems.append(
                memory_cost(2 * hd * n1 // pe, pe * lay.section("thr1").bits, style, fpgapart)
            )
        n1, nh = int(self.get_nodeattr("NumThr1")), int(self.get_nodeattr("NumThrH"))
        if not int(self.get_nodeattr("thr1PerChannel")):
            mems.append(memory_cost(n1, int(self.get_nodeattr("thr1Bits")), "block", fpgapart))
        mems.append(memory_cost(nh, 32, "block", fpgapart))  # hidden thresholds (float32)
        mems.append(memory_cost(n1 + 1, 32, "block", fpgapart))  # activation table
        mems.append(memory_cost(len(self.get_nodeattr("gate_scale_lut")), 32, "block", fpgapart))
        rows = self.tokens * self.top_k
        mems.append(memory_cost(rows, bits_for(self.tokens) + 8, "block", fpgapart))
        mems.append(
            memory_cost(
                hd, DataType[self.get_nodeattr("hiddenDataType")].bitwidth(), "block", fpgapart
            )
        )
        # AXI master read-data FIFO (burst of 64 beats)
        mems.append(memory_cost(64, int(self.get_nodeattr("axi_bits")), "block", fpgapart))
        return mems

    def bram_estimation(self, fpgapart: str) -> int:
        """Expert buffers (unless URAM), biases, tables, AXI FIFO."""
        return sum(m["BRAM_18K"] for m in self._memories(fpgapart))

    def uram_estimation(self, fpgapart: str) -> int:
        """Expert weight buffers (``ram_style`` auto/ultra on parts with URAM)."""
        return sum(m["URAM"] for m in self._memories(fpgapart))

    def dsp_estimation(self, fpgapart: str) -> int:
        """PE x SIMD multipliers (FINN-R rule, resType dsp) + a float32 multiplier per lane."""
        pe, simd = self._fold()
        wb = DataType[self.get_nodeattr("weightDataType")].bitwidth()
        ab = DataType[self.get_nodeattr("inputDataType")].bitwidth()
        mult = pe * simd * math.ceil((wb + ab) / 48) if self.get_nodeattr("resType") == "dsp" else 0
        return int(mult + 3 * pe)

    def lut_estimation(self, fpgapart: str) -> int:
        """MAC array (FINN-R rule), thresholds by binary search, float lane, AXI master."""
        pe, simd = self._fold()
        wb = DataType[self.get_nodeattr("weightDataType")].bitwidth()
        ab = DataType[self.get_nodeattr("inputDataType")].bitwidth()
        acc = int(self.get_nodeattr("AccBits1"))
        mult = 0
        if self.get_nodeattr("resType") == "lut":
            mult = pe * simd * (2 * math.ceil((wb + ab) / 6) - 1) * (wb + ab)
        adder = pe * (wb + ab) * (2 * simd - 1) + pe * acc
        n1, nh = int(self.get_nodeattr("NumThr1")), int(self.get_nodeattr("NumThrH"))
        thresholds = pe * (bits_for(n1) * acc + bits_for(nh) * 40)
        float_lane = pe * 120
        axi = 1500
        control = 300 + self.experts * 2 * bits_for(self.tokens * self.top_k)
        mem_luts = sum(m["LUT"] for m in self._memories(fpgapart))
        return int(mult + adder + thresholds + float_lane + axi + control + mem_luts)

    def get_op_and_param_counts(self) -> dict[str, int]:
        """MACs per frame (top-k rows only) and expert parameters (all in DDR)."""
        wdt = self.get_nodeattr("weightDataType")
        macs = self.tokens * self.top_k * 2 * self.dim * self.hidden
        return {
            f"op_mac_{self.get_nodeattr('inputDataType')}x{wdt}": macs,
            f"param_ddr_weight_{wdt}": self.experts * 2 * self.dim * self.hidden,
        }


@register_hls_op
class ExpertFFN_hls(ExpertFFN, MoEHLS):
    """HLS variant of :class:`ExpertFFN` (kernel ``moe_expert_ffn``)."""

    def defines(self, var: str) -> None:
        """The configuration struct of this node (sizes, widths, DDR layout in beats)."""
        n = self.onnx_node.name
        pe, simd = self._fold()
        lay = self.expert_layout()
        word = lay.axi_bits // 8
        off = int(self.get_nodeattr("ddr_offset"))
        if off % word:
            raise ValueError(f"{n}: ddr_offset {off} is not a multiple of the {word}-byte AXI word")
        sec = {s.name: s for s in lay.sections}
        idt = self.get_input_datatype(0)
        lines = [
            f"struct Cfg_{n} {{",
            f"  static const int T = {self.tokens}, E = {self.experts}, K = {self.top_k};",
            f"  static const int D = {self.dim}, HD = {self.hidden}, PE = {pe}, SIMD = {simd};",
            f"  static const int XB = {idt.bitwidth()};",
            f"  static const bool XSIGNED = {c_bool(idt.signed())};",
            f"  static const int WB = {sec['w1'].bits};",
            f"  static const int RB = {DataType[self.get_nodeattr('routingDataType')].bitwidth()};",
            f"  static const int HB = {DataType[self.get_nodeattr('hiddenDataType')].bitwidth()};",
            f"  static const int AB = {self.get_output_datatype().bitwidth()};",
            f"  static const int ACC1B = {int(self.get_nodeattr('AccBits1'))};",
            f"  static const int ACTH = {int(self.get_nodeattr('ActValH'))};",
            f"  static const int N1 = {int(self.get_nodeattr('NumThr1'))};",
            f"  static const int NH = {int(self.get_nodeattr('NumThrH'))};",
            f"  static const bool THR_PER_CH = {c_bool(self.get_nodeattr('thr1PerChannel'))};",
            f"  static const int B1B = {max(2, sec['b1'].bits)}, B2B = {max(2, sec['b2'].bits)};",
            f"  static const int TB = {max(2, int(self.get_nodeattr('thr1Bits')))};",
            f"  static const int AXI = {lay.axi_bits}, STRIDE = {lay.beats}, BASE = {off // word};",
        ]
        for name in ("w1", "b1", "thr1", "w2", "b2"):
            s = sec[name]
            tag = "THR" if name == "thr1" else name.upper()
            lines.append(
                f"  static const int {tag}_OFF = {s.offset // word}, {tag}_WORDS = {s.words};"
            )
        lines.append("};")
        self.code_gen_dict["$DEFINES$"] = lines

    def params(self, model: Any) -> list[str]:
        """Activation / gate / hidden-threshold tables and the shared pre-activation table."""
        n = self.onnx_node.name
        p = self._params(model)
        tb = max(2, int(self.get_nodeattr("thr1Bits")))
        shared = (
            np.zeros(1, dtype=np.int64)
            if int(self.get_nodeattr("thr1PerChannel"))
            else np.rint(p["thr1"]).astype(np.int64).ravel()
        )
        return [
            c_array("uint32_t", f"act_lut_{n}", f32_bits(self.get_nodeattr("act_lut")), "{}u"),
            c_array(
                "uint32_t", f"gate_lut_{n}", f32_bits(self.get_nodeattr("gate_scale_lut")), "{}u"
            ),
            c_array("uint32_t", f"thr_h_{n}", f32_bits(p["thr_h"]), "{}u"),
            c_array(f"ap_int<{tb + 1}>", f"thr1_{n}", shared, "{}LL"),
        ]

    def extra_args(self) -> list[str]:
        """The expert images (AXI-MM master)."""
        return [f"const ap_uint<{int(self.get_nodeattr('axi_bits'))}> *ddr"]

    def extra_widths(self) -> list[int]:
        """The AXI word."""
        return [int(self.get_nodeattr("axi_bits"))]

    def extra_pragmas(self) -> list[str]:
        """AXI-MM master for the expert images (offset through AXI-lite)."""
        return [
            "#pragma HLS INTERFACE m_axi port=ddr offset=slave bundle=gmem0 "
            "max_read_burst_length=64",
            "#pragma HLS INTERFACE s_axilite port=ddr bundle=control",
            "#pragma HLS INTERFACE s_axilite port=return bundle=control",
        ]

    def docompute(self) -> None:
        """Kernel call."""
        n = self.onnx_node.name
        self.code_gen_dict["$DOCOMPUTE$"] = [
            f"moe_expert_ffn<Cfg_{n}>(in0_V, in1_V, out0_V, ddr, act_lut_{n}, gate_lut_{n}, "
            f"thr1_{n}, thr_h_{n});"
        ]
