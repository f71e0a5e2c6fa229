"""``ExpertDispatch``: tokens + routing -> the T*k rows grouped by expert."""

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
    decode_routing,
    expert_order,
    memory_cost,
)


@register_custom_op
class ExpertDispatch(MoEOp):
    """in0 tokens (1, T, D) + in1 routing (1, T, 2k) -> out0 rows (1, T*k, D).

    Row r is the token of the r-th (expert, token) pair in ascending expert, then token
    order: every token goes to exactly k experts, so the shape is static (no capacity
    factor, nothing dropped). The op holds the frame's T tokens in an on-chip buffer and
    an order table of T*k token indices (counting sort of the routing).
    """

    def get_nodeattr_types(self) -> dict:
        """Node attributes (see finn_flow/moe_ops/README.md)."""
        attrs = super().get_nodeattr_types()
        attrs.update(
            {
                "Dim": ("i", True, 0),
                "SIMD": ("i", False, 1),
                "inputDataType": ("s", True, ""),
                "ram_style": ("s", False, "auto", {"auto", "block", "ultra"}),
            }
        )
        return attrs

    @property
    def dim(self) -> int:
        """D."""
        return int(self.get_nodeattr("Dim"))

    def _simd(self) -> int:
        simd = int(self.get_nodeattr("SIMD"))
        self._check_fold(self.dim, simd, "SIMD")
        return simd

    def get_normal_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """in0 (1, T, D); in1 (1, T, 2k)."""
        return (1, self.tokens, self.dim) if ind == 0 else self.routing_shape()

    def get_normal_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T*k, D)."""
        return (1, self.tokens * self.top_k, self.dim)

    def get_folded_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """in0 (1, T, D/SIMD, SIMD); in1 (1, T, 1, 2k)."""
        if ind == 0:
            return (1, self.tokens, self.dim // self._simd(), self._simd())
        return (1, self.tokens, 1, 2 * self.top_k)

    def get_folded_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T*k, D/SIMD, SIMD)."""
        return (1, self.tokens * self.top_k, self.dim // self._simd(), self._simd())

    def get_input_datatype(self, ind: int = 0) -> DataType:
        """Token codes (in0) or routing (in1)."""
        return DataType[self.get_nodeattr("inputDataType" if ind == 0 else "routingDataType")]

    def get_output_datatype(self, ind: int = 0) -> DataType:
        """Token codes."""
        return DataType[self.get_nodeattr("inputDataType")]

    def get_instream_width(self, ind: int = 0) -> int:
        """SIMD token codes (in0) or one routing beat (in1)."""
        if ind == 0:
            return self._simd() * self.get_input_datatype().bitwidth()
        return self.routing_width()

    def get_outstream_width(self, ind: int = 0) -> int:
        """SIMD token codes per beat."""
        return self._simd() * self.get_input_datatype().bitwidth()

    def execute_node(self, context: dict, graph: Any) -> None:
        """Bit-exact reference: gather the tokens in expert order."""
        node = self.onnx_node
        x = np.asarray(context[node.input[0]]).reshape(self.tokens, self.dim)
        ids, _ = decode_routing(context[node.input[1]], self.top_k)
        _, tokens, _ = expert_order(ids)
        context[node.output[0]] = (
            x[tokens].astype(np.float32).reshape(self.get_normal_output_shape())
        )

    def cycles_for(self, routing: np.ndarray) -> dict[str, Any]:
        """Read T routing beats and T*D/SIMD token beats, prefix E, place T*k, emit
        T*k*D/SIMD row beats (phases in sequence: the token buffer is single)."""
        t, k, e, fold = self.tokens, self.top_k, self.experts, self.dim // self._simd()
        ev = {"route": t, "token": t * fold, "prefix": e, "place": t * k, "row": t * k * fold}
        return {"cycles": sum(ev.values()), "events": ev}

    def _memories(self, fpgapart: str) -> list[dict[str, int]]:
        style = self.get_nodeattr("ram_style")
        simd, xb = self._simd(), self.get_input_datatype().bitwidth()
        rows = self.tokens * self.top_k
        return [
            memory_cost(self.tokens * self.dim // simd, simd * xb, style, fpgapart),
            memory_cost(rows, bits_for(self.tokens), "block", fpgapart),
            memory_cost(self.tokens, self.top_k * bits_for(self.experts), "block", fpgapart),
        ]

    def bram_estimation(self, fpgapart: str) -> int:
        """Token buffer, order table, routing ids (see ``_memories``)."""
        return sum(m["BRAM_18K"] for m in self._memories(fpgapart))

    def uram_estimation(self, fpgapart: str) -> int:
        """Token buffer in URAM when large (``ram_style``)."""
        return sum(m["URAM"] for m in self._memories(fpgapart))

    def lut_estimation(self, fpgapart: str) -> int:
        """Counters and prefix adder per expert, address logic, stream muxes, LUTRAMs."""
        cb = bits_for(self.tokens * self.top_k)
        logic = 150 + self.experts * 2 * cb + 4 * cb * 6
        datapath = self.get_outstream_width() // 2
        return int(logic + datapath + sum(m["LUT"] for m in self._memories(fpgapart)))

    def get_op_and_param_counts(self) -> dict[str, int]:
        """Row copies per frame."""
        return {"op_dispatch_copy": self.tokens * self.top_k * self.dim}


@register_hls_op
class ExpertDispatch_hls(ExpertDispatch, MoEHLS):
    """HLS variant of :class:`ExpertDispatch` (kernel ``moe_dispatch``)."""

    def defines(self, var: str) -> None:
        """The configuration struct of this node."""
        n = self.onnx_node.name
        self.code_gen_dict["$DEFINES$"] = [
            f"struct Cfg_{n} {{",
            f"  static const int T = {self.tokens}, E = {self.experts}, K = {self.top_k};",
            f"  static const int D = {self.dim}, SIMD = {self._simd()};",
            f"  static const int XB = {self.get_input_datatype().bitwidth()};",
            f"  static const int RB = {DataType[self.get_nodeattr('routingDataType')].bitwidth()};",
            "};",
        ]

    def docompute(self) -> None:
        """Kernel call."""
        n = self.onnx_node.name
        self.code_gen_dict["$DOCOMPUTE$"] = [f"moe_dispatch<Cfg_{n}>(in0_V, in1_V, out0_V);"]
