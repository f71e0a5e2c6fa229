"""``ExpertCombine``: the gate-weighted expert rows back into token order."""

from __future__ import annotations

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
from finn_flow.moe_ops.expert_ffn import f32_bits


@register_custom_op
class ExpertCombine(MoEOp):
    """in0 (1, T*k, D, 2) rows in expert order + in1 routing -> out0 (1, T, D) FLOAT32.

    ``out[t] = float32(S_y[t] * scale_y) + float32(S_b[t] * scale_b)`` where ``S_y`` /
    ``S_b`` are the integer sums over token t's k rows of the fc2 accumulators and of the
    gate x b2 terms (``out[token] += g * y`` in the integer domain, then the two
    dequantisation scales of the quantized model, in float32 as the model's own
    elementwise layers compute them). The sums live in a T x D x 2 accumulator buffer
    that is cleared as it is read out.
    """

    def get_nodeattr_types(self) -> dict:
        """Node attributes (see finn_flow/moe_ops/README.md)."""
        attrs = super().get_nodeattr_types()
        attrs.update(
            {
                "Dim": ("i", True, 0),
                "PE": ("i", False, 1),
                "inputDataType": ("s", True, ""),
                "scale_y": ("floats", True, []),
                "scale_b": ("floats", False, []),
                "has_bias": ("i", False, 1),
                "ram_style": ("s", False, "auto", {"auto", "block", "ultra"}),
            }
        )
        return attrs

    @property
    def dim(self) -> int:
        """D."""
        return int(self.get_nodeattr("Dim"))

    def _pe(self) -> int:
        pe = int(self.get_nodeattr("PE"))
        self._check_fold(self.dim, pe, "PE")
        return pe

    def sum_bits(self) -> int:
        """Bits of the per-token sums (k accumulators)."""
        return self.get_input_datatype().bitwidth() + bits_for(self.top_k)

    def get_normal_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """in0 (1, T*k, D, 2); in1 (1, T, 2k)."""
        return (1, self.tokens * self.top_k, self.dim, 2) if ind == 0 else self.routing_shape()

    def get_normal_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T, D)."""
        return (1, self.tokens, self.dim)

    def get_folded_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """in0 (1, T*k, D/PE, 2*PE); in1 (1, T, 1, 2k)."""
        if ind == 0:
            return (1, self.tokens * self.top_k, self.dim // self._pe(), 2 * self._pe())
        return (1, self.tokens, 1, 2 * self.top_k)

    def get_folded_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T, D/PE, PE)."""
        return (1, self.tokens, self.dim // self._pe(), self._pe())

    def get_input_datatype(self, ind: int = 0) -> DataType:
        """Accumulators (in0) or routing (in1)."""
        return DataType[self.get_nodeattr("inputDataType" if ind == 0 else "routingDataType")]

    def get_output_datatype(self, ind: int = 0) -> DataType:
        """FLOAT32 (the dequantised MoE output, as the model's elementwise layers give it)."""
        return DataType["FLOAT32"]

    def get_instream_width(self, ind: int = 0) -> int:
        """PE pairs of accumulators (in0) or one routing beat (in1)."""
        if ind == 0:
            return self._pe() * 2 * self.get_input_datatype().bitwidth()
        return self.routing_width()

    def get_outstream_width(self, ind: int = 0) -> int:
        """PE float32 values per beat."""
        return self._pe() * 32

    def _scales(self) -> tuple[np.ndarray, np.ndarray]:
        sy = np.asarray(self.get_nodeattr("scale_y"), dtype=np.float32)
        sb = np.asarray(self.get_nodeattr("scale_b") or [0.0], dtype=np.float32)
        return sy, sb

    def execute_node(self, context: dict, graph: Any) -> None:
        """Bit-exact reference: integer sums per token, then the float32 epilogue."""
        node = self.onnx_node
        rows = np.rint(np.asarray(context[node.input[0]])).astype(np.int64)
        rows = rows.reshape(self.tokens * self.top_k, self.dim, 2)
        ids, _ = decode_routing(context[node.input[1]], self.top_k)
        _, tokens, _ = expert_order(ids)
        sums = np.zeros((self.tokens, self.dim, 2), dtype=np.int64)
        np.add.at(sums, tokens, rows)
        sy, sb = self._scales()
        # int64 x float32 -> float64 product, rounded once to float32 (exact, |sum| < 2^24)
        y = (sums[..., 0] * sy.astype(np.float64)).astype(np.float32)
        if int(self.get_nodeattr("has_bias")):
            y = y + (sums[..., 1] * sb.astype(np.float64)).astype(np.float32)
        context[node.output[0]] = y.astype(np.float32).reshape(self.get_normal_output_shape())

    def cycles_for(self, routing: np.ndarray) -> dict[str, Any]:
        """Routing T + prefix E + placement T*k, accumulate T*k*D/PE, emit T*D/PE."""
        t, k, fold = self.tokens, self.top_k, self.dim // self._pe()
        ev = {
            "route": t,
            "prefix": self.experts,
            "place": t * k,
            "acc": t * k * fold,
            "out": t * fold,
        }
        return {"cycles": sum(ev.values()), "events": ev}

    def _memories(self, fpgapart: str) -> list[dict[str, int]]:
        pe = self._pe()
        style = self.get_nodeattr("ram_style")
        return [
            memory_cost(self.tokens * self.dim // pe, pe * 2 * self.sum_bits(), style, fpgapart),
            memory_cost(self.tokens * self.top_k, bits_for(self.tokens), "block", fpgapart),
            memory_cost(self.tokens, self.top_k * bits_for(self.experts), "block", fpgapart),
        ]

    def bram_estimation(self, fpgapart: str) -> int:
        """Accumulator buffer (unless URAM), order table, routing ids."""
        return sum(m["BRAM_18K"] for m in self._memories(fpgapart))

    def uram_estimation(self, fpgapart: str) -> int:
        """Accumulator buffer in URAM when large."""
        return sum(m["URAM"] for m in self._memories(fpgapart))

    def dsp_estimation(self, fpgapart: str) -> int:
        """Per lane: two float32 multipliers (3 DSP each) and a float32 adder (2 DSP)."""
        return int(self._pe() * (2 * 3 + (2 if int(self.get_nodeattr("has_bias")) else 0)))

    def lut_estimation(self, fpgapart: str) -> int:
        """Per lane: two accumulate adders, int-to-float converters, float adder glue."""
        pe, sb = self._pe(), self.sum_bits()
        lanes = pe * (2 * sb + 2 * 150 + 250)
        control = 200 + self.experts * 2 * bits_for(self.tokens * self.top_k)
        return int(lanes + control + sum(m["LUT"] for m in self._memories(fpgapart)))

    def get_op_and_param_counts(self) -> dict[str, int]:
        """Accumulations per frame."""
        return {"op_combine_add": self.tokens * self.top_k * self.dim * 2}


@register_hls_op
class ExpertCombine_hls(ExpertCombine, MoEHLS):
    """HLS variant of :class:`ExpertCombine` (kernel ``moe_combine``)."""

    def defines(self, var: str) -> None:
        """The configuration struct of this node."""
        n = self.onnx_node.name
        sy, sb = self._scales()
        self.code_gen_dict["$DEFINES$"] = [
            f"struct Cfg_{n} {{",
            f"  static const int T = {self.tokens}, E = {self.experts}, K = {self.top_k};",
            f"  static const int D = {self.dim}, PE = {self._pe()};",
            f"  static const int AB = {self.get_input_datatype().bitwidth()};",
            f"  static const int SB = {self.sum_bits()};",
            f"  static const int RB = {DataType[self.get_nodeattr('routingDataType')].bitwidth()};",
            f"  static const int SY = {sy.size}, SBN = {sb.size};",
            f"  static const bool HAS_BIAS = {c_bool(self.get_nodeattr('has_bias'))};",
            "};",
        ]

    def params(self, model: Any) -> list[str]:
        """The two dequantisation scales (float32 bit patterns)."""
        n = self.onnx_node.name
        sy, sb = self._scales()
        return [
            c_array("uint32_t", f"scale_y_{n}", f32_bits(sy), "{}u"),
            c_array("uint32_t", f"scale_b_{n}", f32_bits(sb), "{}u"),
        ]

    def docompute(self) -> None:
        """Kernel call."""
        n = self.onnx_node.name
        self.code_gen_dict["$DOCOMPUTE$"] = [
            f"moe_combine<Cfg_{n}>(in0_V, in1_V, out0_V, scale_y_{n}, scale_b_{n});"
        ]
