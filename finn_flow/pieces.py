"""Run FINN steps on a deep pathway piece by piece, then stitch the pieces back together.

finn-plus's graph transformations look tensors and nodes up by linear search, and
streamlining re-runs them to a fixed point, so their cost grows with the square of the
node count: a 2-block pathway streamlines in ~3 min on 2 cores, a 12-block one would take
over an hour. The transformer pathway, though, is a chain: the quantized residual stream
between two halves of a block is a single integer tensor that every path from the input
to the output passes through. Cut there, each piece is an ordinary FINN model whose
input is an integer stream (the residual quantizer's output, with its FINN datatype),
and any step that works node by node or pattern by pattern gives the same graph on the
pieces as on the whole. This module:

- finds those cut tensors (:func:`find_cuts`: outputs of ``MultiThreshold`` nodes, 3-D
  token streams only, so that the task head, whose layout transposes must cancel
  across its convolutions, stays in one piece),
- groups the segments into pieces of at least ``min_nodes`` nodes (:func:`split`),
- runs one graph pass of :mod:`finn_flow.graph_passes` on the pieces in worker
  processes (:func:`run_on_pieces`),
- stitches the results into one model with the boundary tensors' names (:func:`stitch`).

The stitched model is verified like any other (python execution against the Brevitas
output), so a piece that changed its function would be caught there.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

from onnx import helper
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.general import GiveUniqueNodeNames, SortGraph
from qonnx.transformation.infer_shapes import InferShapes


def constant_nodes(model: ModelWrapper) -> set[int]:
    """Indices of the nodes computed from constants only (e.g. QONNX weight quantizers).

    They belong to no position on the data path: :func:`split` puts each into the
    piece(s) of its consumers. ``model`` must be topologically sorted.
    """
    consts = {t.name for t in model.graph.initializer}
    found = set()
    for i, node in enumerate(model.graph.node):
        if all(not name or name in consts for name in node.input):
            found.add(i)
            consts.update(node.output)
    return found


def find_cuts(model: ModelWrapper, cut_ops: Sequence[str] = ("MultiThreshold",)) -> list[str]:
    """Names of the single-tensor cuts that are 3-D outputs of ``cut_ops`` nodes, in order.

    ``cut_ops``: ``MultiThreshold`` on FINN graphs (integer streams), ``Quant`` on QONNX
    graphs (the activation quantizers, whose FINN form is a threshold + scale).

    A tensor T produced by node p (graph in topological order) is a cut when no other
    non-constant tensor produced before p (the graph input included) is read after p:
    every path from the input to the output then passes through T.
    """
    nodes = list(model.graph.node)
    const_idx = constant_nodes(model)
    consts = {t.name for t in model.graph.initializer}
    for i in const_idx:
        consts.update(nodes[i].output)
    outputs = {t.name for t in model.graph.output}
    ndim = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in (*model.graph.value_info, *model.graph.output)
    }
    last_use: dict[str, int] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            if name and name not in consts:
                last_use[name] = i
    for name in outputs:
        last_use[name] = len(nodes)
    reach = max((last_use.get(t.name, -1) for t in model.graph.input), default=-1)
    cuts = []
    for p, node in enumerate(nodes):
        if p in const_idx:
            continue
        # reach = furthest reader of anything produced before node p
        if (
            reach <= p
            and node.op_type in cut_ops
            and len(node.output) == 1
            and node.output[0] not in outputs
            and ndim.get(node.output[0]) == 3
            and _offset_absorbed(model, node)
        ):
            cuts.append(node.output[0])
        for name in node.output:
            reach = max(reach, last_use.get(name, -1))
    return cuts


def _offset_absorbed(model: ModelWrapper, node) -> bool:
    """False for a signed ``MultiThreshold`` whose offset (out_bias < 0) is still a separate
    ``Add`` after it: its output then holds unsigned codes, not yet the annotated values."""
    if node.op_type != "MultiThreshold":
        return True
    from qonnx.custom_op.registry import getCustomOp

    dtype = model.get_tensor_datatype(node.output[0])
    if dtype.name == "BIPOLAR" or not dtype.signed():
        return True
    return getCustomOp(node).get_nodeattr("out_bias") < 0


def _piece(model: ModelWrapper, keep_idx: Sequence[int], inp: str, out: str) -> ModelWrapper:
    """Nodes ``keep_idx`` of ``model`` as a model reading ``inp`` and writing ``out``.

    Built directly from the referenced tensors (initializers, value infos and FINN
    annotations of the tensors these nodes touch), in one pass over the graph.
    """
    g = model.graph
    nodes = [g.node[i] for i in sorted(keep_idx)]
    used = {name for n in nodes for name in (*n.input, *n.output) if name}
    vis = {v.name: v for v in (*g.input, *g.output, *g.value_info)}
    graph = helper.make_graph(
        [copy.deepcopy(n) for n in nodes],
        g.name,
        [copy.deepcopy(vis[inp])],
        [copy.deepcopy(vis[out])],
        [copy.deepcopy(t) for t in g.initializer if t.name in used],
        value_info=[
            copy.deepcopy(v) for v in g.value_info if v.name in used and v.name not in (inp, out)
        ],
    )
    graph.quantization_annotation.extend(
        copy.deepcopy(q) for q in g.quantization_annotation if q.tensor_name in used
    )
    proto = helper.make_model(graph, opset_imports=list(model.model.opset_import))
    proto.ir_version = model.model.ir_version
    return ModelWrapper(proto)


def split(
    model: ModelWrapper, min_nodes: int = 90, cut_ops: Sequence[str] = ("MultiThreshold",)
) -> tuple[list[ModelWrapper], list[str]]:
    """Cut ``model`` into pieces of at least ``min_nodes`` data-path nodes (the last may be
    smaller); nodes computed from constants only go with their consumers (duplicated
    when consumers sit in several pieces).

    Returns the pieces and the boundary tensor names (``len(pieces) - 1`` of them).
    """
    model = model.transform(InferShapes()).transform(SortGraph())
    nodes = list(model.graph.node)
    const_idx = constant_nodes(model)
    data_idx = [i for i in range(len(nodes)) if i not in const_idx]
    pos = {nodes[i].output[0]: k for k, i in enumerate(data_idx) if nodes[i].output}
    bounds, start = [], 0
    for cut in find_cuts(model, cut_ops):
        end = pos[cut] + 1
        if end - start >= min_nodes and len(data_idx) - end >= min_nodes // 3:
            bounds.append(cut)
            start = end
    # piece of every data-path node, then of the constant nodes (from their consumers)
    piece_of: dict[int, set[int]] = {}
    k = 0
    for i in data_idx:
        piece_of[i] = {k}
        if k < len(bounds) and nodes[i].output and nodes[i].output[0] == bounds[k]:
            k += 1
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        for name in node.input:
            consumers.setdefault(name, []).append(i)
    for i in sorted(const_idx, reverse=True):  # consumers come later in topological order
        piece_of[i] = set().union(
            *(piece_of.get(c, set()) for name in nodes[i].output for c in consumers.get(name, []))
        )
    names = [model.graph.input[0].name, *bounds, model.graph.output[0].name]
    pieces = [
        _piece(model, [i for i, ks in piece_of.items() if k in ks], names[k], names[k + 1])
        for k in range(len(bounds) + 1)
    ]
    return pieces, bounds


def stitch(
    pieces: Sequence[ModelWrapper], bounds: Sequence[str], names: tuple[str, str]
) -> ModelWrapper:
    """Join processed pieces back into one model (inverse of :func:`split`).

    Piece k's graph input is renamed to ``bounds[k-1]`` and its output to ``bounds[k]``
    (the first input / last output to ``names`` = (graph input, graph output)); all its
    other tensors get the prefix ``p<k>_`` so that names the pieces share (FINN renames
    tensors after their producer) stay unique. Node names are kept where they are unique
    across the pieces (steps that rename nothing, so folding configs still apply), else
    renumbered by FINN's ``GiveUniqueNodeNames``.
    """
    first = pieces[0].model
    merged = helper.make_graph([], first.graph.name, [], [])
    opsets: dict[str, int] = {}
    for k, piece in enumerate(pieces):
        g = piece.graph
        new_in = names[0] if k == 0 else bounds[k - 1]
        new_out = names[1] if k == len(pieces) - 1 else bounds[k]
        fixed = {g.input[0].name: new_in, g.output[0].name: new_out}

        def rename(name: str, k: int = k, fixed: dict[str, str] = fixed) -> str:
            return fixed.get(name, f"p{k}_{name}" if name else name)

        for node in g.node:
            n = copy.deepcopy(node)
            n.input[:] = [rename(x) for x in n.input]
            n.output[:] = [rename(x) for x in n.output]
            n.name = f"p{k}_{n.name}"
            merged.node.append(n)
        for init in g.initializer:
            t = copy.deepcopy(init)
            t.name = rename(t.name)
            merged.initializer.append(t)
        for vi in list(g.value_info) + ([] if k == 0 else list(g.input)):
            v = copy.deepcopy(vi)
            v.name = rename(v.name)
            merged.value_info.append(v)
        for qa in g.quantization_annotation:
            q = copy.deepcopy(qa)
            q.tensor_name = rename(q.tensor_name)
            merged.quantization_annotation.append(q)
        for op in piece.model.opset_import:
            opsets[op.domain] = max(opsets.get(op.domain, 0), op.version)
    seen: set[str] = set()  # a boundary tensor's annotation comes from both neighbours
    uniq = []
    for q in merged.quantization_annotation:
        if q.tensor_name not in seen:
            seen.add(q.tensor_name)
            uniq.append(q)
    del merged.quantization_annotation[:]
    merged.quantization_annotation.extend(uniq)
    vis = {v.name: v for v in merged.value_info}
    del merged.value_info[:]
    merged.value_info.extend(vis.values())
    gin = copy.deepcopy(pieces[0].graph.input[0])
    gin.name = names[0]
    gout = copy.deepcopy(pieces[-1].graph.output[0])
    gout.name = names[1]
    merged.input.append(gin)
    merged.output.append(gout)
    proto = helper.make_model(
        merged, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
    )
    proto.ir_version = first.ir_version
    model = ModelWrapper(proto)
    plain = [n.name.split("_", 1)[1] for n in model.graph.node]
    if len(set(plain)) == len(plain):  # pieces of a uniquely named graph: keep the names
        for node, name in zip(model.graph.node, plain, strict=True):
            node.name = name
        return model
    return model.transform(GiveUniqueNodeNames())


def _run_piece(job: dict) -> dict:
    """Worker: run one graph pass of :mod:`finn_flow.graph_passes` on one piece."""
    from finn_flow.finn_env import start_finn

    start_finn(job["finn_root"])
    from finn.builder.build_dataflow_config import DataflowBuildConfig

    from finn_flow.graph_passes import PIECE_PASSES

    cfg = DataflowBuildConfig.from_json(Path(job["cfg_json"]).read_text())
    t0 = time.time()
    model = PIECE_PASSES[job["pass"]](ModelWrapper(job["path"]), cfg)
    seconds = time.time() - t0
    path = f"{job['path'][: -len('.onnx')]}_{job['pass']}.onnx"
    model.save(path)
    return {"index": job["index"], "seconds": seconds, "saved": path}


def run_on_pieces(
    pieces: Sequence[ModelWrapper],
    pass_name: str,
    work: Path,
    finn_root: str,
    cfg_json: Path,
    workers: int,
) -> list[dict]:
    """Run the graph pass ``pass_name`` on every piece, ``workers`` pieces at a time.

    Pieces are saved under ``work``; each worker (a spawned process) starts FINN itself
    (settings under ``finn_root``) and reads FINN's build config from ``cfg_json``.
    Returns, per piece in order, ``{"index", "seconds", "saved": model path}``. Progress
    is printed as pieces finish.
    """
    work.mkdir(parents=True, exist_ok=True)
    jobs = []
    for k, piece in enumerate(pieces):
        path = str(work / f"piece{k:02d}.onnx")
        piece.save(path)
        jobs.append(
            {
                "index": k,
                "path": path,
                "pass": pass_name,
                "finn_root": str(finn_root),
                "cfg_json": str(cfg_json),
            }
        )
    # largest pieces first, so that the slowest one does not start last
    jobs.sort(key=lambda j: -os.path.getsize(j["path"]))
    results: list[dict] = []
    t0 = time.time()
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(_run_piece, job) for job in jobs]
        for fut in as_completed(futures):
            res = fut.result()
            results.append(res)
            print(
                f"[pieces] {len(results)}/{len(jobs)} done (piece {res['index']}, "
                f"{res['seconds']:.0f} s; {time.time() - t0:.0f} s elapsed)",
                flush=True,
            )
    return sorted(results, key=lambda r: r["index"])
