"""``TopKGate``: router probability codes -> k (expert id, gate code) pairs per token."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from finn.custom_op.fpgadataflow import register_custom_op
from finn.custom_op.fpgadataflow.hls import register_custom_op as register_hls_op
from qonnx.core.datatype import DataType

from finn_flow.moe_ops.base import MoEHLS, MoEOp, c_array


def topk_select(p: np.ndarray, k: int) -> np.ndarray:
    """Expert ids (T, k) of the k largest codes per row of p (T, E): descending, ties to
    the lower id (a stable sort of -p)."""
    return np.argsort(-np.asarray(p, dtype=np.int64), axis=1, kind="stable")[:, :k]


@register_custom_op
class TopKGate(MoEOp):
    """in0 probabilities (1, T, E) codes -> out0 routing (1, T, 2k).

    Per token: the k experts with the largest probability codes, descending, ties to the
    lower expert id (the stand-in's pairwise comparison network computes the same set),
    then the gate code of each: ``gate_lut[probability code]`` (the re-quantisations of the
    quantized model composed into one table; the identity when they share a grid).
    """

    def get_nodeattr_types(self) -> dict:
        """Node attributes (see finn_flow/moe_ops/README.md)."""
        attrs = super().get_nodeattr_types()
        attrs.update(
            {
                "PE": ("i", False, 1),
                "inputDataType": ("s", True, ""),
                "gateDataType": ("s", True, ""),
                "gate_lut": ("ints", True, []),
            }
        )
        return attrs

    # shapes / types / widths
    def get_normal_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T, E)."""
        return (1, self.tokens, self.experts)

    def get_normal_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T, 2k)."""
        return self.routing_shape()

    def get_folded_input_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T, E/PE, PE)."""
        pe = int(self.get_nodeattr("PE"))
        self._check_fold(self.experts, pe, "PE")
        return (1, self.tokens, self.experts // pe, pe)

    def get_folded_output_shape(self, ind: int = 0) -> tuple[int, ...]:
        """(1, T, 1, 2k): one token per beat."""
        return (1, self.tokens, 1, 2 * self.top_k)

    def get_input_datatype(self, ind: int = 0) -> DataType:
        """Probability codes."""
        return DataType[self.get_nodeattr("inputDataType")]

    def get_output_datatype(self, ind: int = 0) -> DataType:
        """Routing elements."""
        return DataType[self.get_nodeattr("routingDataType")]

    def get_instream_width(self, ind: int = 0) -> int:
        """PE probability codes per beat."""
        return int(self.get_nodeattr("PE")) * self.get_input_datatype().bitwidth()

    def get_outstream_width(self, ind: int = 0) -> int:
        """One token's routing per beat."""
        return self.routing_width()

    # oracle
    def execute_node(self, context: dict, graph: Any) -> None:
        """Bit-exact reference: stable descending sort, first k, gate table."""
        node = self.onnx_node
        p = np.asarray(context[node.input[0]]).reshape(self.tokens, self.experts)
        codes = np.rint(p).astype(np.int64)
        lo = int(self.get_input_datatype().min())
        lut = np.asarray(self.get_nodeattr("gate_lut"), dtype=np.int64)
        ids = topk_select(codes, self.top_k)
        gates = lut[np.take_along_axis(codes, ids, axis=1) - lo]
        out = np.concatenate([ids, gates], axis=1).astype(np.float32)
        context[node.output[0]] = out.reshape(self.get_normal_output_shape())

    # cycles / resources
    def cycles_for(self, routing: np.ndarray) -> dict[str, Any]:
        """T * E/PE beats (one insertion step per probability, PE per cycle)."""
        beats = self.tokens * self.experts // int(self.get_nodeattr("PE"))
        return {"cycles": beats, "events": {"beat": beats}}

    def lut_estimation(self, fpgapart: str) -> int:
        """Insertion network: per lane k comparators + (id, code) muxes; gate ROM; control."""
        pe, k = int(self.get_nodeattr("PE")), self.top_k
        pb = self.get_input_datatype().bitwidth()
        ib = max(1, math.ceil(math.log2(self.experts)))
        gb = DataType[self.get_nodeattr("gateDataType")].bitwidth()
        network = pe * k * (math.ceil(pb / 2) + 2 * (pb + ib))
        rom = math.ceil((1 << pb) * gb / 64)
        return int(120 + network + rom)

    def get_op_and_param_counts(self) -> dict[str, int]:
        """Comparisons per frame."""
        return {"op_topk_compare": self.tokens * self.experts * self.top_k}


@register_hls_op
class TopKGate_hls(TopKGate, MoEHLS):
    """HLS variant of :class:`TopKGate` (kernel ``moe_topk_gate``)."""

    def defines(self, var: str) -> None:
        """The configuration struct of this node."""
        n = self.onnx_node.name
        self.code_gen_dict["$DEFINES$"] = [
            f"struct Cfg_{n} {{",
            f"  static const int T = {self.tokens}, E = {self.experts}, K = {self.top_k};",
            f"  static const int PE = {self.get_nodeattr('PE')};",
            f"  static const int PB = {self.get_input_datatype().bitwidth()};",
            f"  static const int RB = {self.get_output_datatype().bitwidth()};",
            "};",
        ]

    def params(self, model: Any) -> list[str]:
        """The gate table."""
        return [c_array("int", f"gate_lut_{self.onnx_node.name}", self.get_nodeattr("gate_lut"))]

    def docompute(self) -> None:
        """Kernel call."""
        n = self.onnx_node.name
        self.code_gen_dict["$DOCOMPUTE$"] = [
            f"moe_topk_gate<Cfg_{n}>(in0_V, out0_V, gate_lut_{n});"
        ]
