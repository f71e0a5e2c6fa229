"""Replace each MoE layer's stand-in region of the streamlined graph by the reordered engine.

The stand-in (``finn_flow.quant_model.QuantMoE``) computes every expert for every token
and weights them with top-k gates that are zero elsewhere. After streamlining, one MoE
layer is (integer tensors between MultiThresholds; names as FINN gives them)::

    x ─┬─ MatMul router ─ MultiThreshold ─ Mul ─ Softmax ─ MultiThreshold = P
       └─ MatMul fc1 (D x E*Hd) ─ MultiThreshold (pre-act) ─ [activation table] ─ Mul ─┐
    P ─┬─ MatMul diff (E x E*E) ─ MultiThreshold ─ MatMul count ─ MultiThreshold = drop  │
       └─ Mul ─ [gate arithmetic with drop] ─ MultiThreshold ─ MultiThreshold = G        │
    G ─┬─ MatMul expand (E x E*Hd, 0/1) ─ MultiThreshold ─ Mul ─────────── Mul (h x g) ─┘
       └─ MatMul bias2 (E x D) ─ Mul ─┐                                      │
                                 Y = Add(Mul(MatMul fc2 (E*Hd x D)(MultiThreshold(h x g))), ·)

The region between the tensors P (router probability codes) and x (the LayerNorm'd token
codes) and the tensor Y (the dequantised MoE output that enters the residual add) is
replaced by ``TopKGate(P) -> DuplicateStreams -> ExpertDispatch(x) -> ExpertFFN ->
ExpertCombine = Y``. The router, its thresholds and the softmax stay and become finn-plus
layers in the conversion to HW layers that follows.

Why the streamlined graph and not the HW-layer graph: the streamlined graph still
matches the Brevitas model node for node, and the stand-in's region is found and
executed there as it is. (On the way to HW layers the stand-in's comparison network
needs its {0, 1} codes retyped from BIPOLAR, see
:class:`finn_flow.transforms.MultiThresholdOutputTypes`; the engine replaces that
network, so the swap does not depend on it.)

The new ops' parameters are read off the stand-in's nodes: the weight matrices are
sliced per expert; the element-wise chains (activation, gate re-quantisation and scales)
are tabulated by executing the stand-in's own nodes on every possible input code; the
thresholds of integer accumulators are rounded up to integers (exact for integer inputs).
Before the graph is changed, both forms are executed on the layer's actual inputs (the
full-context execution of the graph on each input array) and must agree bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp

from finn_flow.moe_ops.base import bits_for, decode_routing, part_urams
from finn_flow.moe_ops.ddr import assign_ddr_offsets, signed_bits
from finn_flow.moe_ops.expert_ffn import DEFAULT_AXI_LATENCY

DOMAIN = "finn.custom_op.fpgadataflow"
PARAM_NAMES = ("w1", "b1", "thr1", "w2", "b2", "thr_h")
#: float32 holds every integer below this exactly; the stand-in's accumulators must stay
#: below it for its (float32) execution to be an integer computation
F32_EXACT = 1 << 24


class MoESwapError(RuntimeError):
    """A stand-in region could not be replaced, or the two forms differ."""


@dataclass
class Region:
    """One MoE stand-in region: its boundary tensors, roles and nodes."""

    index: int
    p: str  # router probability codes (1, T, E)
    x: str  # token branch feeding fc1 (1, T, D)
    y: str  # dequantised MoE output (1, T, D)
    g: str  # gate codes feeding expand / bias2 (1, T, E)
    drop: str  # bipolar "not in top-k" tensor of the comparison network
    nodes: dict[str, Any] = field(default_factory=dict)  # role -> node
    chains: dict[str, list] = field(default_factory=dict)  # role -> node list
    members: list = field(default_factory=list)  # every node of the region


# ------------------------------------------------------------------------- graph helpers
def _consumers(model: ModelWrapper, tensor: str) -> list:
    return list(model.find_consumers(tensor) or [])


def _is_const(model: ModelWrapper, tensor: str) -> bool:
    return model.get_initializer(tensor) is not None


def _dyn_inputs(model: ModelWrapper, node: Any) -> list[str]:
    """Inputs that are not initializers."""
    return [t for t in node.input if t and not _is_const(model, t)]


def _single_consumer(model: ModelWrapper, tensor: str, what: str) -> Any:
    cons = _consumers(model, tensor)
    if len(cons) != 1:
        raise MoESwapError(f"{what}: tensor {tensor!r} has {len(cons)} consumers, expected 1")
    return cons[0]


def _is_matmul(model: ModelWrapper, node: Any) -> bool:
    return node.op_type == "MatMul" and _is_const(model, node.input[1])


def _mm(model: ModelWrapper, node: Any) -> tuple[int, int]:
    """(MW, MH) = (inputs, outputs) of a MatMul with constant weights."""
    w = model.get_initializer(node.input[1])
    return int(w.shape[0]), int(w.shape[1])


def _follow_unary(model: ModelWrapper, start: str, stop: Any) -> tuple[list, Any]:
    """Nodes after tensor ``start`` while they have one dynamic input and one consumer,
    until ``stop(node)`` is true; returns (chain, stopping node)."""
    chain, tensor = [], start
    while True:
        node = _single_consumer(model, tensor, "stand-in chain")
        if stop(node):
            return chain, node
        if len(_dyn_inputs(model, node)) != 1 or len(node.output) != 1:
            raise MoESwapError(
                f"stand-in chain from {start!r}: unexpected node {node.name} ({node.op_type})"
            )
        chain.append(node)
        tensor = node.output[0]


def _backward_closure(model: ModelWrapper, target: str, stops: set[str]) -> list:
    """Nodes on paths into ``target`` back to the ``stops`` tensors (initializers end a
    path); fails when a path reaches a graph input or anything else."""
    seen, out, todo = set(), [], [target]
    while todo:
        t = todo.pop()
        if t in stops or _is_const(model, t):
            continue
        node = model.find_producer(t)
        if node is None:
            raise MoESwapError(f"gate arithmetic reaches tensor {t!r}, which has no producer")
        if node.name in seen:
            continue
        seen.add(node.name)
        out.append(node)
        todo += [i for i in node.input if i]
    return out


def _exec_nodes(model: ModelWrapper, nodes: list, feeds: dict[str, np.ndarray]) -> dict:
    """Execute ``nodes`` (sorted here) with the graph's own executors on frame-shaped
    ``feeds``; returns the context."""
    from qonnx.core.onnx_exec import execute_node

    opset = next((o.version for o in model.model.opset_import if o.domain == ""), 18)
    ctx = dict(feeds)
    pending = list(nodes)
    while pending:
        progressed = False
        for node in list(pending):
            ins = [i for i in node.input if i]
            if not all(i in ctx or _is_const(model, i) for i in ins):
                continue
            for i in ins:
                if i not in ctx:
                    ctx[i] = model.get_initializer(i)
            for o in node.output:
                ctx[o] = np.zeros(model.get_tensor_shape(o), dtype=np.float32)
            execute_node(node, ctx, model.graph, opset)
            pending.remove(node)
            progressed = True
        if not progressed:
            raise MoESwapError(f"cannot evaluate {[n.name for n in pending]} from {list(feeds)}")
    return ctx


def _tabulate(
    model: ModelWrapper, nodes: list, inp: str, out: str, values: np.ndarray,
    extra: dict[str, float] | None = None, what: str = "table",
) -> np.ndarray:  # fmt: skip
    """f(v) for every v in ``values``, where f is the element-wise chain ``nodes`` from
    tensor ``inp`` to ``out``, run on frames of the graph's own shape (each token row
    holds one value in every channel; every channel must give the same result).
    ``extra``: other chain inputs held at a constant value."""
    shape = model.get_tensor_shape(inp)
    rows = int(np.prod(shape[:-1]))
    result = []
    for start in range(0, len(values), rows):
        chunk = np.asarray(values[start : start + rows], dtype=np.float32)
        col = np.concatenate([chunk, np.repeat(chunk[-1:], rows - len(chunk))])
        frame = np.broadcast_to(col.reshape(rows, 1), (rows, shape[-1])).reshape(shape)
        feeds = {inp: np.ascontiguousarray(frame, dtype=np.float32)}
        for name, val in (extra or {}).items():
            feeds[name] = np.full(model.get_tensor_shape(name), val, dtype=np.float32)
        got = np.asarray(_exec_nodes(model, nodes, feeds)[out], dtype=np.float32)
        got = got.reshape(rows, -1)[: len(chunk)]
        if not np.array_equal(
            got.view(np.uint32), np.repeat(got[:, :1], got.shape[1], 1).view(np.uint32)
        ):
            raise MoESwapError(
                f"{what} differs between channels; the MoE ops need one shared table"
            )
        result.append(got[:, 0])
    return np.concatenate(result)


# ------------------------------------------------------------------------- finding regions
def find_regions(model: ModelWrapper) -> list[Region]:
    """Every MoE stand-in region of the streamlined graph (graph order)."""
    regions = []
    for diff in model.graph.node:
        if not _is_matmul(model, diff):
            continue
        mw, mh = _mm(model, diff)
        if mw < 2 or mh != mw * mw:
            continue
        cons = _consumers(model, diff.output[0])
        if len(cons) != 1 or cons[0].op_type != "MultiThreshold":
            continue
        t_beats = cons[0]
        cons = _consumers(model, t_beats.output[0])
        if len(cons) != 1 or not _is_matmul(model, cons[0]) or _mm(model, cons[0]) != (mh, mw):
            continue
        count = cons[0]
        t_drop = _single_consumer(model, count.output[0], f"count {count.name}")
        if t_drop.op_type != "MultiThreshold":
            continue
        regions.append(_trace_region(model, len(regions), diff, t_beats, count, t_drop))
    return regions


def _trace_region(model, index, diff, t_beats, count, t_drop) -> Region:
    e = _mm(model, diff)[0]
    p, drop = diff.input[0], t_drop.output[0]
    where = f"MoE stand-in at {diff.name}"
    # forward from P and drop to the MatMuls that read the gate codes G
    reached, frontier, seen = [], [drop, p], {diff.name}
    while frontier:
        t = frontier.pop()
        for node in _consumers(model, t):
            if node.name in seen:
                continue
            seen.add(node.name)
            if _is_matmul(model, node):
                reached.append(node)
            else:
                frontier += list(node.output)
    srcs = {n.input[0] for n in reached}
    if len(srcs) != 1:
        raise MoESwapError(f"{where}: the gate MatMuls read {sorted(srcs)}, expected one tensor")
    g = srcs.pop()
    expand = bias2 = None
    for node in reached:
        mw, mh = _mm(model, node)
        if mw != e:
            raise MoESwapError(f"{where}: {node.name} reads the gates with MW {mw}, expected {e}")
        w = model.get_initializer(node.input[1])
        blocks = np.kron(np.eye(e), np.ones((1, mh // e))) if mh % e == 0 else None
        if expand is None and blocks is not None and np.array_equal(w, blocks):
            expand = node
        elif bias2 is None:
            bias2 = node
        else:
            raise MoESwapError(f"{where}: more than two MatMuls read the gates")
    if expand is None:
        raise MoESwapError(f"{where}: no 0/1 gate-expansion MatMul found")

    def is_join(n):
        return n.op_type == "Mul" and len(_dyn_inputs(model, n)) == 2

    def is_add(n):
        return n.op_type == "Add" and len(_dyn_inputs(model, n)) == 2

    g_chain, m_hg = _follow_unary(model, expand.output[0], is_join)
    g_end = g_chain[-1].output[0] if g_chain else expand.output[0]
    h_in = [t for t in _dyn_inputs(model, m_hg) if t != g_end]
    if len(h_in) != 1:
        raise MoESwapError(f"{m_hg.name}: cannot tell the activation input from the gate input")
    # back from the activation input to fc1: the activation may be a small DAG (e.g. GELU
    # as two threshold tables of the same codes, subtracted)
    h_nodes, fc1s, todo, seen = {}, {}, [h_in[0]], set()
    while todo:
        t = todo.pop()
        if t in seen:
            continue
        seen.add(t)
        prod = model.find_producer(t)
        if prod is None:
            raise MoESwapError(f"{m_hg.name}: activation input {t!r} has no producer")
        if _is_matmul(model, prod):
            fc1s[prod.name] = prod
            continue
        h_nodes[prod.name] = prod
        todo += _dyn_inputs(model, prod)
    if len(fc1s) != 1:
        raise MoESwapError(f"{m_hg.name}: the activation comes from {sorted(fc1s)}, not one fc1")
    fc1 = next(iter(fc1s.values()))
    first = _single_consumer(model, fc1.output[0], f"fc1 {fc1.name}")
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    h_chain = sorted(h_nodes.values(), key=lambda n: order[n.name])
    if first.name not in h_nodes or h_chain[0].name != first.name:
        raise MoESwapError(f"{fc1.name}: expected its only consumer to start the activation")
    hid_chain, fc2 = _follow_unary(model, m_hg.output[0], lambda n: _is_matmul(model, n))
    y_chain = []
    node = _single_consumer(model, fc2.output[0], f"fc2 {fc2.name}")
    while node.op_type == "Mul" and len(_dyn_inputs(model, node)) == 1:
        y_chain.append(node)
        nxt = _consumers(model, node.output[0])
        if len(nxt) != 1:
            break
        node = nxt[0]
    b_chain, add = [], None
    if bias2 is not None:
        b_chain, add = _follow_unary(model, bias2.output[0], is_add)
        joined = y_chain and _single_consumer(model, y_chain[-1].output[0], "fc2 scale").name
        if joined != add.name:
            raise MoESwapError(f"{where}: the fc2 and bias branches do not meet in one Add")
        y = add.output[0]
    else:
        if not y_chain:
            raise MoESwapError(f"{where}: no scale after {fc2.name}")
        y = y_chain[-1].output[0]
    gate_nodes = _backward_closure(model, g, {p, drop})
    members = [diff, t_beats, count, t_drop, expand, m_hg, fc1, fc2] + gate_nodes + g_chain
    members += h_chain + hid_chain + y_chain + b_chain + [n for n in (bias2, add) if n is not None]
    uniq = {n.name: n for n in members}
    region = Region(index, p, fc1.input[0], y, g, drop, members=list(uniq.values()))
    region.nodes = {
        "diff": diff, "t_beats": t_beats, "count": count, "t_drop": t_drop, "expand": expand,
        "bias2": bias2, "fc1": fc1, "fc2": fc2, "m_hg": m_hg, "add": add,
    }  # fmt: skip
    region.chains = {
        "gate": gate_nodes, "g": g_chain, "h": h_chain, "hid": hid_chain,
        "y": y_chain, "b": b_chain,
    }  # fmt: skip
    _check_closed(model, region)
    return region


def _check_closed(model: ModelWrapper, region: Region) -> None:
    """Every region tensor is used inside the region only (except Y), and every region
    input is P, x or a constant."""
    names = {n.name for n in region.members}
    produced = {o for n in region.members for o in n.output}
    outputs = {t.name for t in model.graph.output}
    for n in region.members:
        for i in _dyn_inputs(model, n):
            if i not in produced and i not in (region.p, region.x):
                raise MoESwapError(f"MoE region {region.index}: {n.name} reads {i!r} from outside")
        for o in n.output:
            if o == region.y:
                continue
            outside = [c.name for c in _consumers(model, o) if c.name not in names]
            if outside or o in outputs:
                raise MoESwapError(
                    f"MoE region {region.index}: {o!r} of {n.name} is also used by {outside}"
                )
    outside = [c.name for c in _consumers(model, region.p) if c.name not in names]
    if outside:
        raise MoESwapError(f"MoE region {region.index}: probabilities also read by {outside}")


# ------------------------------------------------------------------------- parameters
def _acc_bound(w: np.ndarray, x_dt: DataType) -> np.ndarray:
    """Per output channel: the largest |accumulator| of x @ w for x of type x_dt."""
    xmax = max(abs(int(x_dt.min())), abs(int(x_dt.max())))
    return np.abs(w.astype(np.int64)).sum(axis=0) * xmax


def _int_thresholds(thr: np.ndarray) -> np.ndarray:
    """Thresholds on an integer input, as integers: v >= t  <=>  v >= ceil(t)."""
    t = np.asarray(thr, dtype=np.float64)
    t = np.where(np.isposinf(t), 2.0**40, np.where(np.isneginf(t), -(2.0**40), t))
    return np.ceil(t).astype(np.int64)


def _mt_affine(model: ModelWrapper, node: Any) -> tuple[float, float]:
    inst = getCustomOp(node)
    return float(inst.get_nodeattr("out_scale")), float(inst.get_nodeattr("out_bias"))


def _top_k_of(model: ModelWrapper, region: Region, e: int) -> tuple[int, float, float]:
    """(k, kept value, dropped value) of the comparison network, by running it on
    frames of distinct probability codes and of ties."""
    from finn_flow.moe_ops.topk_gate import topk_select

    shape = model.get_tensor_shape(region.p)
    rows = int(np.prod(shape[:-1]))
    rng = np.random.default_rng(0)
    nodes = [region.nodes[r] for r in ("diff", "t_beats", "count", "t_drop")]
    ks, kept_vals = set(), set()
    probes = []
    for _ in range(3):
        probe = np.stack([rng.permutation(e) * 3 + 1 for _ in range(rows)])
        probe[0] = 7  # all tied: the lower ids must win
        probes.append(probe)
    results = []
    for probe in probes:
        ctx = _exec_nodes(model, nodes, {region.p: probe.reshape(shape).astype(np.float32)})
        drop = np.asarray(ctx[region.drop]).reshape(rows, e)
        top1 = topk_select(probe, 1)[:, 0]
        kept_vals |= set(drop[np.arange(rows), top1].tolist())
        results.append((probe, drop))
    if len(kept_vals) != 1:
        raise MoESwapError(f"MoE region {region.index}: the top expert maps to {kept_vals}")
    kept = kept_vals.pop()
    dropped_vals = set()
    for _, drop in results:
        sel = drop == kept
        ks |= set(sel.sum(axis=1).tolist())
        dropped_vals |= set(drop[~sel].tolist())
    if len(ks) != 1 or len(dropped_vals) > 1:
        raise MoESwapError(f"MoE region {region.index}: the comparison network keeps {ks} experts")
    k = ks.pop()
    dropped = dropped_vals.pop() if dropped_vals else (1.0 if kept != 1.0 else 0.0)
    for probe, drop in results:
        ref = np.zeros((rows, e), dtype=bool)
        np.put_along_axis(ref, topk_select(probe, k), True, axis=1)
        if not np.array_equal(drop == kept, ref):
            raise MoESwapError(f"MoE region {region.index}: the comparison network is not "
                               f"top-{k} with ties to the lower expert id")  # fmt: skip
    return k, float(kept), float(dropped)


def extract(model: ModelWrapper, region: Region) -> dict[str, Any]:
    """Sizes, datatypes and parameters of the reordered ops for one region."""
    nd = region.nodes
    fc1, fc2 = nd["fc1"], nd["fc2"]
    d, ehd = _mm(model, fc1)
    e = _mm(model, nd["diff"])[0]
    if ehd % e:
        raise MoESwapError(f"{fc1.name}: {ehd} outputs is not a multiple of {e} experts")
    hd = ehd // e
    if _mm(model, fc2) != (ehd, d):
        raise MoESwapError(f"{fc2.name}: weights {_mm(model, fc2)}, expected ({ehd}, {d})")
    tshape = model.get_tensor_shape(region.p)
    tokens = int(np.prod(tshape[:-1]))
    x_dt = model.get_tensor_datatype(region.x)
    p_dt = model.get_tensor_datatype(region.p)
    g_dt = model.get_tensor_datatype(region.g)
    if (
        not (x_dt.is_integer() and p_dt.is_integer() and g_dt.is_integer())
        or p_dt.signed()
        or g_dt.signed()
    ):
        raise MoESwapError(
            f"MoE region {region.index}: x {x_dt}, P {p_dt}, G {g_dt}: expected integer "
            "tokens and unsigned probability / gate codes"
        )
    k, kept, dropped = _top_k_of(model, region, e)
    # --- gate codes of selected experts; non-selected must give 0
    codes = np.arange(int(p_dt.min()), int(p_dt.max()) + 1)
    gate_nodes = region.chains["gate"]
    g_sel = _tabulate(
        model, gate_nodes, region.p, region.g, codes, {region.drop: kept}, "gate code table"
    )
    g_drop = _tabulate(
        model, gate_nodes, region.p, region.g, codes, {region.drop: dropped}, "gate code table"
    )
    if np.any(g_drop != 0):
        raise MoESwapError(f"MoE region {region.index}: a non-selected expert gets a non-zero gate")
    gate_lut = np.rint(g_sel).astype(np.int64)
    # --- fc1 + pre-activation thresholds + activation table
    w1 = model.get_initializer(fc1.input[1]).astype(np.int64)  # (D, E*Hd)
    h_chain = region.chains["h"]
    if not h_chain or h_chain[0].op_type != "MultiThreshold":
        raise MoESwapError(f"{fc1.name}: expected a MultiThreshold after it")
    t_pre = h_chain[0]
    sc1, act1 = _mt_affine(model, t_pre)
    if sc1 != 1.0 or act1 != int(act1):
        raise MoESwapError(f"{t_pre.name}: out_scale {sc1}, out_bias {act1}: expected 1, integer")
    thr_f = model.get_initializer(t_pre.input[1])
    n1 = thr_f.shape[1]
    bound1 = _acc_bound(w1, x_dt)
    if bound1.max() >= F32_EXACT:
        raise MoESwapError(f"{fc1.name}: accumulators up to {bound1.max()} exceed 2^24")
    thr_i = _int_thresholds(thr_f)
    if np.any(np.diff(thr_i, axis=1) < 0):
        raise MoESwapError(f"{t_pre.name}: thresholds are not sorted")
    shift = thr_i[:, :1] - thr_i[:1, :1]
    if thr_i.shape[0] == 1:
        per_ch, thr1, b1 = 0, thr_i.reshape(1, 1, n1), np.zeros((e, hd), dtype=np.int64)
    elif np.array_equal(thr_i - shift, np.repeat(thr_i[:1], thr_i.shape[0], axis=0)):
        per_ch, thr1 = 0, thr_i[:1].reshape(1, 1, n1)
        b1 = (-shift[:, 0]).reshape(e, hd)
    else:
        per_ch, thr1, b1 = 1, thr_i.reshape(e, hd, n1), np.zeros((e, hd), dtype=np.int64)
    lim = int(bound1.max()) + int(np.abs(b1).max()) + 1
    thr1 = np.clip(thr1, -lim, lim)
    act_codes = np.arange(n1 + 1) + int(act1)
    act_lut = _tabulate(model, h_chain[1:], t_pre.output[0], h_chain[-1].output[0], act_codes,
                        what="activation table")  # fmt: skip
    # --- gate scale table (expand is the 0/1 block matrix: channel c gets G[c // Hd])
    gcodes = np.arange(int(g_dt.min()), int(g_dt.max()) + 1)
    g_chain = region.chains["g"]
    g_out = g_chain[-1].output[0] if g_chain else nd["expand"].output[0]
    gate_scale = _tabulate(model, g_chain, nd["expand"].output[0], g_out, gcodes, what="gate scale")
    # --- hidden quantizer
    hid = region.chains["hid"]
    if len(hid) != 1 or hid[0].op_type != "MultiThreshold":
        raise MoESwapError(f"{nd['m_hg'].name}: expected one MultiThreshold before {fc2.name}")
    sch, act_h = _mt_affine(model, hid[0])
    if sch != 1.0 or act_h != int(act_h):
        raise MoESwapError(f"{hid[0].name}: out_scale {sch}, out_bias {act_h}: expected 1, integer")
    thr_h = model.get_initializer(hid[0].input[1]).astype(np.float32)
    if thr_h.shape[0] != 1:
        raise MoESwapError(f"{hid[0].name}: per-channel hidden thresholds are not supported")
    if np.any(np.diff(thr_h, axis=1) < 0):
        raise MoESwapError(f"{hid[0].name}: thresholds are not sorted")
    hid_dt = model.get_tensor_datatype(hid[0].output[0])
    # --- fc2, bias, scales
    w2 = model.get_initializer(fc2.input[1]).astype(np.int64)  # (E*Hd, D)
    bound2 = _acc_bound(w2, hid_dt)
    bias2 = nd["bias2"]
    b2 = np.zeros((e, d), dtype=np.int64)
    if bias2 is not None:
        b2 = model.get_initializer(bias2.input[1]).astype(np.int64)  # (E, D)
    boundb = int(g_dt.max()) * int(np.abs(b2).sum(axis=0).max())
    if max(int(bound2.max()), boundb) >= F32_EXACT:
        raise MoESwapError(
            f"{fc2.name}: accumulators up to {max(bound2.max(), boundb)} exceed 2^24"
        )

    def scale_of(chain: list, what: str) -> np.ndarray:
        if len(chain) != 1 or chain[0].op_type != "Mul":
            raise MoESwapError(f"MoE region {region.index}: {what} is not one Mul")
        c = [model.get_initializer(i) for i in chain[0].input if _is_const(model, i)]
        if len(c) != 1 or c[0].size not in (1, d):
            raise MoESwapError(f"{chain[0].name}: expected a constant scale of size 1 or {d}")
        return np.asarray(c[0], dtype=np.float32).ravel()

    scale_y = scale_of(region.chains["y"], "the fc2 scale")
    scale_b = scale_of(region.chains["b"], "the bias scale") if bias2 is not None else np.zeros(1)
    acc_bits = signed_bits(np.array([bound2.max(), -bound2.max(), boundb, -boundb]))
    rb = max(bits_for(e - 1), g_dt.bitwidth())
    return {
        "T": tokens, "D": d, "Hd": hd, "E": e, "k": k,
        "x_dt": x_dt, "p_dt": p_dt, "g_dt": g_dt, "hid_dt": hid_dt,
        "w_dt": DataType[f"INT{signed_bits(np.concatenate([w1.ravel(), w2.ravel()]))}"],
        "routing_dt": DataType[f"UINT{rb}"], "acc_dt": DataType[f"INT{acc_bits}"],
        "acc1_bits": signed_bits(np.array([lim, -lim])) + 1,
        "gate_lut": gate_lut, "act_lut": act_lut, "gate_scale": gate_scale,
        "w1": w1.reshape(d, e, hd).transpose(1, 0, 2), "b1": b1, "thr1": thr1, "per_ch": per_ch,
        "w2": w2.reshape(e, hd, d), "b2": b2, "thr_h": thr_h, "act_h": int(act_h),
        "scale_y": scale_y, "scale_b": scale_b, "has_bias": int(bias2 is not None),
    }  # fmt: skip


# ------------------------------------------------------------------------- folding
def _divisors(n: int) -> list[int]:
    return [i for i in range(1, n + 1) if n % i == 0]


def default_folding(prm: dict[str, Any], axi_bits: int, beats: int, latency: int) -> dict:
    """Default PE/SIMD of the engine.

    ``ExpertFFN``: the smallest MAC array (PE x SIMD, SIMD <= 32) with which the mean
    expert (T*k/E rows) computes in about the time one expert image takes to fetch, so
    neither the DDR nor the MAC array idles in the average frame. The other three ops:
    the least parallelism that keeps each within a quarter of ``ExpertFFN``'s worst case
    (they are never the layer's bottleneck, and stay cheap).
    """
    from finn_flow.moe_ops.schedule import ffn_worst_case

    del axi_bits
    d, hd, t, k, e = prm["D"], prm["Hd"], prm["T"], prm["k"], prm["E"]
    common = _divisors(math.gcd(d, hd))
    macs = 2 * d * hd * (t * k / e)
    target = max(1, math.ceil(macs / (latency + beats)))
    best = None  # smallest PE x SIMD >= target; among equals the widest SIMD (<= 32)
    for simd in [s for s in common if s <= 32]:
        for pe in common:
            if pe * simd >= target and (best is None or pe * simd <= best[0] * best[1]):
                best = (pe, simd)
    pe, simd = best or (max(common), max(s for s in common if s <= 32))
    row = (hd // pe) * (d // simd) + (d // pe) * (hd // simd)
    worst, _ = ffn_worst_case(e, t * k, beats, latency, row, t + e + t * k)
    budget = max(1, worst // 4)

    def least(n: int, cycles) -> int:
        return next((f for f in _divisors(n) if cycles(f) <= budget), n)

    return {
        "TopKGate": {"PE": least(e, lambda f: t * e // f)},
        "ExpertDispatch": {"SIMD": least(d, lambda f: t + e + t * k + (t + t * k) * (d // f))},
        "ExpertFFN": {"PE": pe, "SIMD": simd},
        "ExpertCombine": {"PE": least(d, lambda f: t + e + t * k + (t * k + t) * (d // f))},
    }


# ------------------------------------------------------------------------- new nodes
def build_nodes(model: ModelWrapper, region: Region, prm: dict[str, Any], *, axi_bits: int,
                fpgapart: str, folding: dict | None = None) -> list:  # fmt: skip
    """The replacement nodes (TopKGate, DuplicateStreams, ExpertDispatch, ExpertFFN,
    ExpertCombine); their parameter tensors are added to ``model`` as initializers."""
    i = region.index
    pre = f"moe{i}"
    t, d, hd, e, k = prm["T"], prm["D"], prm["Hd"], prm["E"], prm["k"]
    rdt = prm["routing_dt"]
    names = {s: f"{pre}_{s}" for s in ("routing", "r0", "r1", "r2", "rows", "yrows")}
    params = {
        "w1": (prm["w1"], prm["w_dt"]), "b1": (prm["b1"], DataType[f"INT{signed_bits(prm['b1'])}"]),
        "thr1": (prm["thr1"], DataType[f"INT{signed_bits(prm['thr1'])}"]),
        "w2": (prm["w2"], prm["w_dt"]), "b2": (prm["b2"], DataType[f"INT{signed_bits(prm['b2'])}"]),
        "thr_h": (prm["thr_h"], DataType["FLOAT32"]),
    }  # fmt: skip
    for key, (val, dt) in params.items():
        name = f"{pre}_{key}"
        model.set_initializer(name, np.asarray(val, dtype=np.float32))
        model.set_tensor_datatype(name, dt)
    common = {"NumTokens": t, "NumExperts": e, "TopK": k, "routingDataType": rdt.name,
              "backend": "fpgadataflow"}  # fmt: skip
    topk = helper.make_node(
        "TopKGate", [region.p], [names["routing"]], domain=DOMAIN, name=f"TopKGate_moe{i}",
        inputDataType=prm["p_dt"].name, gateDataType=prm["g_dt"].name,
        gate_lut=[int(v) for v in prm["gate_lut"]], **common,
    )  # fmt: skip
    dup = helper.make_node(
        "DuplicateStreams", [names["routing"]], [names["r0"], names["r1"], names["r2"]],
        domain=DOMAIN, name=f"DuplicateStreams_moe{i}", backend="fpgadataflow",
        NumChannels=2 * k, PE=1, NumOutputStreams=3, inputDataType=rdt.name,
        numInputVectors=[1, t],
    )  # fmt: skip
    disp = helper.make_node(
        "ExpertDispatch", [region.x, names["r0"]], [names["rows"]], domain=DOMAIN,
        name=f"ExpertDispatch_moe{i}", Dim=d, inputDataType=prm["x_dt"].name, **common,
    )  # fmt: skip
    ffn = helper.make_node(
        "ExpertFFN",
        [names["rows"], names["r1"]] + [f"{pre}_{p}" for p in PARAM_NAMES],
        [names["yrows"]], domain=DOMAIN, name=f"ExpertFFN_moe{i}", Dim=d, HiddenDim=hd,
        inputDataType=prm["x_dt"].name, weightDataType=prm["w_dt"].name,
        hiddenDataType=prm["hid_dt"].name, accDataType=prm["acc_dt"].name,
        AccBits1=prm["acc1_bits"], ActValH=prm["act_h"],
        act_lut=[float(v) for v in prm["act_lut"]],
        gate_scale_lut=[float(v) for v in prm["gate_scale"]],
        thr1PerChannel=prm["per_ch"], NumThr1=int(prm["thr1"].shape[-1]),
        NumThrH=int(prm["thr_h"].shape[-1]), b1Bits=signed_bits(prm["b1"]),
        thr1Bits=signed_bits(prm["thr1"]), b2Bits=signed_bits(prm["b2"]),
        axi_bits=axi_bits, axi_latency=DEFAULT_AXI_LATENCY, **common,
    )  # fmt: skip
    comb = helper.make_node(
        "ExpertCombine", [names["yrows"], names["r2"]], [region.y], domain=DOMAIN,
        name=f"ExpertCombine_moe{i}", Dim=d, inputDataType=prm["acc_dt"].name,
        scale_y=[float(v) for v in prm["scale_y"]], scale_b=[float(v) for v in prm["scale_b"]],
        has_bias=prm["has_bias"], **common,
    )  # fmt: skip
    nodes = [topk, dup, disp, ffn, comb]
    ram = "auto" if part_urams(fpgapart) else "block"
    for node in (disp, ffn, comb):
        getCustomOp(node).set_nodeattr("ram_style", ram)
    beats = getCustomOp(ffn).expert_layout().beats
    fold = default_folding(prm, axi_bits, beats, DEFAULT_AXI_LATENCY)
    for op, attrs in (folding or {}).items():
        fold.setdefault(op, {}).update(attrs)
    for node in nodes:
        inst = getCustomOp(node)
        for key, val in fold.get(node.op_type, {}).items():
            inst.set_nodeattr(key, int(val))
        if node.op_type != "DuplicateStreams":
            inst.get_folded_input_shape(0)  # refuses PE / SIMD that do not divide
            inst.get_folded_output_shape(0)
    # shapes and datatypes of the new tensors
    shapes = {
        names["routing"]: (1, t, 2 * k), names["r0"]: (1, t, 2 * k), names["r1"]: (1, t, 2 * k),
        names["r2"]: (1, t, 2 * k), names["rows"]: (1, t * k, d), names["yrows"]: (1, t * k, d, 2),
    }  # fmt: skip
    for name, shape in shapes.items():
        model.set_tensor_shape(name, list(shape))
    for name in ("routing", "r0", "r1", "r2"):
        model.set_tensor_datatype(names[name], rdt)
    model.set_tensor_datatype(names["rows"], prm["x_dt"])
    model.set_tensor_datatype(names["yrows"], prm["acc_dt"])
    return nodes


def run_nodes(model: ModelWrapper, nodes: list, feeds: dict[str, np.ndarray]) -> dict:
    """Execute the replacement nodes on ``feeds`` (their own execute_node); returns the
    context (feeds, initializers and every output)."""
    ctx = dict(feeds)
    for node in nodes:
        for i in node.input:
            if i not in ctx:
                ctx[i] = model.get_initializer(i)
        if node.op_type == "DuplicateStreams":
            for o in node.output:
                ctx[o] = ctx[node.input[0]]
        else:
            getCustomOp(node).execute_node(ctx, model.graph)
    return ctx


def _dense_gates(routing: np.ndarray, k: int, e: int) -> np.ndarray:
    ids, gates = decode_routing(routing, k)
    dense = np.zeros((ids.shape[0], e), dtype=np.int64)
    np.put_along_axis(dense, ids, gates, axis=1)
    return dense


def _first_diff(a: np.ndarray, b: np.ndarray) -> str:
    idx = np.argwhere(a != b)
    if idx.size == 0:
        idx = np.argwhere(a.view(np.uint32) != b.view(np.uint32)) if a.dtype == np.float32 else idx
    pos = tuple(int(v) for v in idx[0])
    return f"first at {pos}: stand-in {a[pos]!r}, reordered {b[pos]!r} ({len(idx)} positions)"


def engine_model(
    prm: dict[str, Any], *, axi_bits: int = 128, folding: dict | None = None
) -> ModelWrapper:
    """A model holding only the engine (TopKGate -> DuplicateStreams -> ExpertDispatch ->
    ExpertFFN -> ExpertCombine) for parameters ``prm`` in the form :func:`extract` returns.

    Inputs ``probabilities`` (1, T, E) and ``tokens`` (1, T, D), output ``moe_out`` (1, T, D).
    Used by the tests and for exploring foldings without a FINN build.
    """
    from onnx import TensorProto
    from qonnx.util.basic import qonnx_make_model

    t, d, e = prm["T"], prm["D"], prm["E"]
    inp_p = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [1, t, e])
    inp_x = helper.make_tensor_value_info("tokens", TensorProto.FLOAT, [1, t, d])
    out_y = helper.make_tensor_value_info("moe_out", TensorProto.FLOAT, [1, t, d])
    graph = helper.make_graph([], "moe_engine", [inp_p, inp_x], [out_y])
    model = ModelWrapper(qonnx_make_model(graph, producer_name="finn_flow.moe_ops"))
    model.set_tensor_datatype("probabilities", prm["p_dt"])
    model.set_tensor_datatype("tokens", prm["x_dt"])
    region = Region(0, "probabilities", "tokens", "moe_out", "", "")
    for node in build_nodes(model, region, prm, axi_bits=axi_bits, fpgapart="", folding=folding):
        model.graph.node.append(node)
    assign_ddr_offsets(model)
    return model


# ------------------------------------------------------------------------- entry point
def replace_moe_standins(
    model: ModelWrapper,
    inputs: list[np.ndarray],
    *,
    expected_layers: int | None = None,
    top_k: int | None = None,
    axi_bits: int = 128,
    fpgapart: str = "xczu7ev-ffvc1156-2-e",
    folding: dict | None = None,
) -> tuple[ModelWrapper, list[dict[str, Any]]]:
    """Replace every MoE stand-in region by the reordered engine (see the module docstring).

    Args:
        model: the whole streamlined graph (after streamlining and its verification,
            before the conversion to HW layers).
        inputs: arrays for the graph input; both forms are executed on each.
        expected_layers: fail unless exactly this many regions are found.
        top_k: fail unless every region selects exactly top_k experts.
        axi_bits: AXI data width of the expert-weight port.
        fpgapart: the FPGA part (memory estimates).
        folding: op type -> {"PE": .., "SIMD": ..} overriding the balanced default.

    Returns:
        (model, reports): the new model and one JSON-ready dict per region.

    Raises:
        MoESwapError: a region does not have the stand-in's structure, or the two forms
            differ on an input (the message names layer, tensor and position).
    """
    from finn.core.onnx_exec import execute_onnx
    from qonnx.transformation.general import SortGraph
    from qonnx.transformation.infer_datatypes import InferDataTypes
    from qonnx.transformation.infer_shapes import InferShapes

    regions = find_regions(model)
    if expected_layers is not None and len(regions) != expected_layers:
        raise MoESwapError(f"found {len(regions)} MoE stand-in regions, expected {expected_layers}")
    if not regions:
        return model, []
    if not inputs:
        raise MoESwapError("no input arrays: the swap must be checked on actual inputs")
    prms = [extract(model, r) for r in regions]
    for r, prm in zip(regions, prms):
        if top_k is not None and prm["k"] != top_k:
            raise MoESwapError(f"MoE region {r.index} selects top-{prm['k']}, expected {top_k}")
    iname = model.graph.input[0].name
    contexts = [execute_onnx(model, {iname: np.asarray(x, dtype=np.float32)}, True) for x in inputs]
    new_nodes = [build_nodes(model, r, p, axi_bits=axi_bits, fpgapart=fpgapart, folding=folding)
                 for r, p in zip(regions, prms)]  # fmt: skip
    routings: list[list[np.ndarray]] = [[] for _ in regions]
    for n_in, ctx in enumerate(contexts):
        for r, prm, nodes in zip(regions, prms, new_nodes):
            got = run_nodes(model, nodes, {r.p: ctx[r.p], r.x: ctx[r.x]})
            routing = got[nodes[0].output[0]]
            dense = _dense_gates(routing, prm["k"], prm["E"])
            want_g = np.rint(ctx[r.g]).astype(np.int64).reshape(dense.shape)
            if not np.array_equal(dense, want_g):
                raise MoESwapError(f"MoE layer {r.index}, input {n_in}: gate codes ({r.g}) differ, "
                                   + _first_diff(want_g, dense))  # fmt: skip
            want, have = np.asarray(ctx[r.y], np.float32), np.asarray(got[r.y], np.float32)
            if want.shape != have.shape or not np.array_equal(
                want.view(np.uint32), have.view(np.uint32)
            ):
                raise MoESwapError(f"MoE layer {r.index}, input {n_in}: output {r.y} differs, "
                                   + _first_diff(want.reshape(have.shape), have))  # fmt: skip
            routings[r.index].append(routing)
    # swap: drop every region node, add the new ones, sort
    for r, nodes in zip(regions, new_nodes):
        for n in r.members:
            model.graph.node.remove(n)
        for n in nodes:
            model.graph.node.append(n)
    model = model.transform(SortGraph())
    model = model.transform(InferShapes())
    model = model.transform(InferDataTypes())
    from qonnx.transformation.general import RemoveUnusedTensors

    model = model.transform(RemoveUnusedTensors())
    assign_ddr_offsets(model)
    reports = []
    for r, prm, nodes in zip(regions, prms, new_nodes):
        byname = {n.name: n for n in model.graph.node}
        insts = {n.op_type: getCustomOp(byname[n.name]) for n in nodes}
        ffn = insts["ExpertFFN"]
        per = [ffn.cycles_for(x) for x in routings[r.index]]
        cyc = [int(c["cycles"]) for c in per]
        byt = [int(c["load_bytes"]) for c in per]
        reports.append(
            {
                "layer": r.index,
                "nodes": {n.op_type: n.name for n in nodes},
                "tensors": {"probabilities": r.p, "tokens": r.x, "output": r.y,
                            "routing": nodes[0].output[0]},  # fmt: skip
                "removed_nodes": len(r.members),
                "tokens": prm["T"], "dim": prm["D"], "hidden": prm["Hd"],
                "experts": prm["E"], "top_k": prm["k"],
                "folding": {op: {a: int(i.get_nodeattr(a)) for a in ("PE", "SIMD")
                                 if a in i.get_nodeattr_types()} for op, i in insts.items()
                            if op != "DuplicateStreams"},  # fmt: skip
                "swap_check": {"inputs": len(inputs), "identical": True,
                               "compared": ["gate codes", "output"]},  # fmt: skip
                "cycles": {
                    "worst_case": int(ffn.get_exp_cycles()),
                    "per_input": cyc,
                    "mean": float(np.mean(cyc)),
                    "max": int(np.max(cyc)),
                    "no_overlap_per_input": [int(c["no_overlap_cycles"]) for c in per],
                    "ops_worst_case": {op: int(i.get_exp_cycles()) for op, i in insts.items()
                                       if op != "DuplicateStreams"},  # fmt: skip
                },
                "expert_ddr_bytes_per_frame": {
                    "worst": int(ffn.worst_case_load_bytes()),
                    "per_input": byt,
                    "mean": float(np.mean(byt)),
                    "max": int(np.max(byt)),
                },
                "non_empty_experts_per_input": [len(c["schedule"].steps) for c in per],
                "onchip_expert_buffer_bytes": int(ffn.onchip_buffer_bytes()),
                "expert_image_bytes": int(ffn.expert_bytes()),
                "ddr_image_bytes": int(ffn.expert_bytes() * prm["E"]),
                "ddr_offset": int(ffn.get_nodeattr("ddr_offset")),
                "thresholds": "per-channel pre-activation tables in DDR" if prm["per_ch"]
                else "one shared pre-activation table on chip, integer bias b1 in DDR",
            }
        )  # fmt: skip
    return model, reports
