"""DDR image of the experts: packed, AXI-aligned, one image per ``ExpertFFN`` node.

Layout of one expert (all experts of a node have the same size, the *stride*):

==========  ==========================  =============================================
section     elements                    order
==========  ==========================  =============================================
``w1``      Hd * D weights              output neuron major: ``w1[e][:, o]`` for o
``b1``      Hd integer biases           accumulator grid (``acc + b1 >= thresholds``)
``thr1``    Hd * n1 thresholds          only when each channel has its own table
``w2``      D * Hd weights              output neuron major: ``w2[e][:, o]`` for o
``b2``      D integer biases            multiplied by the gate code on chip
==========  ==========================  =============================================

Each section starts on an AXI word; a word holds ``axi_bits // bits`` whole elements
(two's complement, element ``j`` of a word at bits ``[j*bits, (j+1)*bits)``, words
little-endian in memory), the same convention as finn-plus's ``fetch_weights`` DMA for
streamed MVAU weights. One expert is read as ``stride / (axi_bits / 8)`` consecutive beats.
Each node's image (E experts) starts at its ``ddr_offset`` (4 KiB aligned) in
``moe_experts.bin``; ``moe_experts.json`` records every offset.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: node images start on 4 KiB boundaries (AXI bursts never cross a 4 KiB page)
NODE_ALIGN = 4096
SECTIONS = ("w1", "b1", "thr1", "w2", "b2")


@dataclass(frozen=True)
class Section:
    """One section of an expert image: byte offset, element count and width."""

    name: str
    offset: int
    count: int
    bits: int
    words: int


@dataclass(frozen=True)
class ExpertLayout:
    """Byte layout of one expert image (see the module docstring)."""

    axi_bits: int
    sections: tuple[Section, ...]
    stride: int

    @property
    def beats(self) -> int:
        """AXI beats that move one expert."""
        return self.stride // (self.axi_bits // 8)

    def section(self, name: str) -> Section:
        """The section called ``name``."""
        for s in self.sections:
            if s.name == name:
                return s
        raise KeyError(name)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "axi_bits": self.axi_bits,
            "stride_bytes": self.stride,
            "beats": self.beats,
            "sections": [asdict(s) for s in self.sections],
        }


def signed_bits(values: np.ndarray) -> int:
    """Smallest two's-complement width (>= 2) that holds every value."""
    v = np.asarray(values, dtype=np.int64)
    if v.size == 0:
        return 2
    hi, lo = int(v.max()), int(v.min())
    bits = 2
    while not (-(1 << (bits - 1)) <= lo and hi <= (1 << (bits - 1)) - 1):
        bits += 1
    return bits


def expert_layout(
    dim: int, hidden: int, counts: dict[str, int], bits: dict[str, int], axi_bits: int
) -> ExpertLayout:
    """Layout of one expert image.

    Args:
        dim: D; hidden: Hd (only used for documentation of the counts).
        counts: elements per section (``thr1`` 0 when the thresholds are shared).
        bits: element width per section.
        axi_bits: AXI data width (a multiple of 8, at least the widest element).
    """
    del dim, hidden
    if axi_bits % 8 or axi_bits < 8:
        raise ValueError(f"axi_bits must be a positive multiple of 8, got {axi_bits}")
    word = axi_bits // 8
    sections, offset = [], 0
    for name in SECTIONS:
        n = int(counts.get(name, 0))
        b = int(bits.get(name, 0)) if n else 0
        if n and b > axi_bits:
            raise ValueError(f"section {name}: {b}-bit elements exceed the {axi_bits}-bit AXI word")
        words = -(-n // (axi_bits // b)) if n else 0
        sections.append(Section(name, offset, n, b, words))
        offset += words * word
    return ExpertLayout(axi_bits, tuple(sections), offset)


def pack_section(values: np.ndarray, bits: int, axi_bits: int) -> bytes:
    """Pack integers (two's complement, ``bits`` wide) into AXI words, whole elements each."""
    v = np.asarray(values, dtype=np.int64).ravel()
    if v.size == 0:
        return b""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if v.min() < lo or v.max() > hi:
        raise ValueError(f"values {v.min()}..{v.max()} do not fit {bits}-bit two's complement")
    per = axi_bits // bits
    words = -(-v.size // per)
    u = (v & ((1 << bits) - 1)).astype(np.uint64)
    u = np.concatenate([u, np.zeros(words * per - v.size, dtype=np.uint64)])
    bitmat = ((u[:, None] >> np.arange(bits, dtype=np.uint64)[None, :]) & 1).astype(np.uint8)
    bitmat = bitmat.reshape(words, per * bits)
    pad = np.zeros((words, axi_bits - per * bits), dtype=np.uint8)
    allbits = np.concatenate([bitmat, pad], axis=1)
    return np.packbits(allbits, axis=1, bitorder="little").tobytes()


def pack_expert(layout: ExpertLayout, arrays: dict[str, np.ndarray]) -> bytes:
    """One expert image (``layout.stride`` bytes) from its section arrays."""
    out = bytearray(layout.stride)
    for s in layout.sections:
        if s.count == 0:
            continue
        data = pack_section(arrays[s.name], s.bits, layout.axi_bits)
        if (
            len(data) != s.words * layout.axi_bits // 8
            or np.asarray(arrays[s.name]).size != s.count
        ):
            raise ValueError(f"section {s.name}: {np.asarray(arrays[s.name]).size} elements, "
                             f"layout expects {s.count}")  # fmt: skip
        out[s.offset : s.offset + len(data)] = data
    return bytes(out)


def moe_ffn_nodes(model: Any) -> list[tuple[Any, Any]]:
    """(model, node) of every ExpertFFN node, following StreamingDataflowPartition children."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.custom_op.registry import getCustomOp

    found = []
    for node in model.graph.node:
        if node.op_type.startswith("ExpertFFN"):
            found.append((model, node))
        elif node.op_type == "StreamingDataflowPartition":
            child = ModelWrapper(getCustomOp(node).get_nodeattr("model"))
            found += moe_ffn_nodes(child)
    return found


def assign_ddr_offsets(model: Any) -> int:
    """Give every ExpertFFN node a 4 KiB-aligned ``ddr_offset`` (graph order); returns the
    total image size in bytes."""
    from qonnx.custom_op.registry import getCustomOp

    offset = 0
    for _, node in moe_ffn_nodes(model):
        inst = getCustomOp(node)
        inst.set_nodeattr("ddr_offset", offset)
        size = inst.expert_layout().stride * inst.get_nodeattr("NumExperts")
        offset += -(-size // NODE_ALIGN) * NODE_ALIGN
    return offset


def node_image(model: Any, node: Any) -> bytes:
    """The E expert images of one ExpertFFN node, concatenated (E * stride bytes)."""
    from qonnx.custom_op.registry import getCustomOp

    inst = getCustomOp(node)
    layout = inst.expert_layout()
    params = inst.expert_params(model)
    return b"".join(
        pack_expert(layout, {k: v[e] for k, v in params.items()})
        for e in range(inst.get_nodeattr("NumExperts"))
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_ddr_image(model: Any, out_dir: str | Path) -> dict[str, Any]:
    """Write ``moe_experts.bin`` + ``moe_experts.json`` for every ExpertFFN node.

    Each node's image goes to its ``ddr_offset`` (set by the MoE replacement; nodes whose
    images would overlap are an error). Returns the JSON layout.
    """
    from qonnx.custom_op.registry import getCustomOp

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    nodes = moe_ffn_nodes(model)
    if not nodes:
        raise ValueError("the model holds no ExpertFFN node: nothing to write")
    blob = bytearray()
    entries, spans = [], []
    for mw, node in nodes:
        inst = getCustomOp(node)
        layout = inst.expert_layout()
        image = node_image(mw, node)
        off = int(inst.get_nodeattr("ddr_offset"))
        if off % NODE_ALIGN:
            raise ValueError(f"{node.name}: ddr_offset {off} is not {NODE_ALIGN}-byte aligned")
        for a, b, other in spans:
            if off < b and a < off + len(image):
                raise ValueError(f"{node.name}: image [{off}, {off + len(image)}) overlaps {other}")
        spans.append((off, off + len(image), node.name))
        if len(blob) < off + len(image):
            blob.extend(b"\0" * (off + len(image) - len(blob)))
        blob[off : off + len(image)] = image
        e_count = inst.get_nodeattr("NumExperts")
        entries.append(
            {
                "node": node.name,
                "output_tensor": node.output[0],
                "ddr_offset": off,
                "bytes": len(image),
                "experts": [
                    {"expert": e, "offset": off + e * layout.stride, "bytes": layout.stride}
                    for e in range(e_count)
                ],
                "layout": layout.as_dict(),
                "element_types": inst.section_types(),
            }
        )
    doc = {
        "file": "moe_experts.bin",
        "bytes": len(blob),
        "axi_bits": sorted({e["layout"]["axi_bits"] for e in entries}),
        "node_alignment": NODE_ALIGN,
        "nodes": entries,
        "packing": "two's complement, whole elements per AXI word, element j at bits "
        "[j*bits, (j+1)*bits), words little-endian; sections w1, b1, thr1, w2, b2 per expert",
    }
    _atomic_write(out / "moe_experts.bin", bytes(blob))
    _atomic_write(out / "moe_experts.json", (json.dumps(doc, indent=2) + "\n").encode())
    return doc
