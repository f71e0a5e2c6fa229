"""Small graph transformations the M3ViT pathway needs on top of finn-plus's own.

All of them keep the graph's function unchanged (they move or copy constant scale nodes,
or correct type annotations), so the Python execution before and after is identical.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
from onnx import TensorProto, helper
from qonnx.core.datatype import DataType
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.custom_op.registry import getCustomOp
from qonnx.transformation.base import Transformation
from qonnx.transformation.general import (
    GiveUniqueNodeNames,
    GiveUniqueParameterTensors,
    SortGraph,
)
from qonnx.transformation.infer_datatypes import InferDataTypes
from qonnx.transformation.infer_shapes import InferShapes
from qonnx.transformation.remove import RemoveIdentityOps


class DuplicateForkedConstMul(Transformation):
    """Give every consumer of a forked constant ``Mul`` its own copy of the ``Mul``.

    The ONNX exporter merges identical quantizers (common-subexpression elimination), so
    a de-quantization ``Mul`` (integer stream x scale) often feeds several MatMuls. FINN
    can then not move the scale past the MatMuls and the MatMuls see a float input and do
    not become MVAUs. After this pass each MatMul has its own ``Mul``, which FINN's
    ``Streamline`` moves past it and absorbs into the next threshold.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        """Apply once over the graph; returns (model, changed)."""
        graph = model.graph
        changed = False
        for node in list(graph.node):
            if node.op_type != "Mul" or model.get_initializer(node.input[1]) is None:
                continue
            consumers = model.find_consumers(node.output[0]) or []
            if len(consumers) < 2 or node.output[0] in [o.name for o in graph.output]:
                continue
            idx = list(graph.node).index(node)
            for i, consumer in enumerate(consumers[1:], start=1):
                new_out = f"{node.output[0]}_fork{i}"
                clone = copy.deepcopy(node)
                clone.name = f"{node.name}_fork{i}"
                clone.output[0] = new_out
                graph.node.insert(idx + i, clone)
                for j, name in enumerate(consumer.input):
                    if name == node.output[0]:
                        consumer.input[j] = new_out
                vi = model.get_tensor_valueinfo(node.output[0])
                if vi is not None:
                    new_vi = copy.deepcopy(vi)
                    new_vi.name = new_out
                    graph.value_info.append(new_vi)
                model.set_tensor_datatype(new_out, model.get_tensor_datatype(node.output[0]))
            changed = True
        return model, changed


class ExtractMultiThresholdScaleBiasOnce(Transformation):
    """finn-plus's ``ExtractMultiThresholdScaleBias`` in one pass over the graph.

    Same result: every ``MultiThreshold`` with ``out_scale != 1`` or ``out_bias != 0``
    gets a ``Mul`` (scalar scale) and then an ``Add`` (scalar bias) after it and its
    attributes reset to 1 and 0; then the graph is sorted, identity ops removed,
    parameter tensors made unique and datatypes inferred. finn-plus's version runs those
    four whole-graph passes after *each* threshold node, and as each pass returns a copy
    of the model while it goes on editing the old one, it handles one node per call and
    repeats: quadratic in the node count (about 60 % of the streamlining time of an
    attention block of the default FPGA config). Here the four passes run once.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        """Extract every scale / bias in one pass; returns (model, False)."""
        graph = model.graph
        changed = False
        for node in [n for n in graph.node if n.op_type == "MultiThreshold"]:
            inst = getCustomOp(node)
            scale = inst.get_nodeattr("out_scale")
            bias = inst.get_nodeattr("out_bias")
            if scale == 1.0 and bias == 0.0:
                continue
            shape = model.get_tensor_shape(node.input[0])
            final, last = node.output[0], node
            for value, op, attr, neutral in (
                (scale, "Mul", "out_scale", 1.0),
                (bias, "Add", "out_bias", 0.0),
            ):
                if value == neutral:
                    continue
                act = model.make_new_valueinfo_name()
                graph.value_info.append(
                    helper.make_tensor_value_info(act, TensorProto.FLOAT, shape)
                )
                const = model.make_new_valueinfo_name()
                model.set_initializer(const, np.array(value, dtype=np.float32))
                last.output[0] = act
                graph.node.append(helper.make_node(op, [act, const], [final]))
                last = graph.node[-1]
                inst.set_nodeattr(attr, neutral)
            changed = True
        if changed:
            model = model.transform(SortGraph())
            model = model.transform(RemoveIdentityOps())
            model = model.transform(GiveUniqueParameterTensors())
            model = model.transform(InferDataTypes())
        return model, False


class MultiThresholdOutputTypes(Transformation):
    """Annotate each ``MultiThreshold`` output with a type that holds what it emits.

    A ``MultiThreshold`` with ``out_scale`` 1 emits the integers ``out_bias + 0 ...
    out_bias + T`` (T thresholds per channel). Streamlining can leave one whose annotation
    cannot hold them: a bipolar quantizer's ``2 y - 1`` is moved out of it and absorbed
    into the *next* layer's thresholds, so it emits {0, 1} while its output (and
    ``out_dtype``) still say BIPOLAR. The conversion to HW layers would then make a
    Thresholding layer that emits -1 / +1, which the next layer's thresholds, computed for
    {0, 1}, misread: the top-k gate's comparison network then kept too many experts, with
    doubled gates (3 of 4 for top-2). Such outputs are retyped to the smallest UINTn /
    INTn with n >= 2 holding the range (qonnx's 1-bit unsigned type is BINARY, which
    finn-plus's HLS MVAU refuses as an input). Nodes whose annotation already holds the
    range, or with ``out_scale`` != 1 or a non-integer ``out_bias``, are left as they
    are. The Python execution is unchanged.
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        """Retype the outputs that cannot hold their range; returns (model, False)."""
        for node in model.graph.node:
            if node.op_type != "MultiThreshold":
                continue
            inst = getCustomOp(node)
            bias = float(inst.get_nodeattr("out_bias"))
            if float(inst.get_nodeattr("out_scale")) != 1.0 or bias != int(bias):
                continue
            thresholds = model.get_initializer(node.input[1])
            if thresholds is None:
                continue
            low, high = int(bias), int(bias) + int(thresholds.shape[-1])
            annotated = model.get_tensor_datatype(node.output[0])
            if annotated.allowed(low) and annotated.allowed(high):
                continue
            if low >= 0:
                fitted = DataType[f"UINT{max(high.bit_length(), 2)}"]
            else:
                bits = max((-low - 1).bit_length(), high.bit_length()) + 1
                fitted = DataType[f"INT{max(bits, 2)}"]
            inst.set_nodeattr("out_dtype", fitted.name)
            model.set_tensor_datatype(node.output[0], fitted)
        return model, False


def _count(x: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """MultiThreshold count: for each x, how many thresholds are <= x."""
    return (x[:, None] >= thresholds[None, :]).sum(axis=1)


class GeluToThresholds(Transformation):
    """Replace ``int -> Mul(s) -> GELU -> MultiThreshold`` by exact integer thresholds.

    finn-plus maps GELU to ``PWPolyF``, which exists only for Versal parts (it uses the
    DSPFP32 primitive), so it cannot be built for the ZCU104. Between two quantizers GELU
    is a function of an integer: ``y[i] = MT(GELU(s * i))`` for every value i of the input
    datatype. That table is unimodal (GELU falls, then rises), so it splits into a
    non-decreasing part and a non-increasing part, each of which is a standard
    MultiThreshold (thresholding layer) of the same integer:

        y[i] = base + up(i) - down(i)

    with ``up`` / ``down`` counting thresholds at half-integers. The result is exact:
    the table is computed with the same float32 GELU (erf form) as the Brevitas model.
    New nodes: two MultiThreshold (-> Thresholding), one Sub and one Add (-> Elementwise).
    """

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        """Rewrite every matching GELU; returns (model, changed)."""
        import torch

        graph = model.graph
        for gelu in list(graph.node):
            if gelu.op_type != "PWPolyF":
                continue
            mul = model.find_producer(gelu.input[0])
            consumers = model.find_consumers(gelu.output[0]) or []
            if mul is None or mul.op_type != "Mul" or len(consumers) != 1:
                continue
            mt = consumers[0]
            scale = model.get_initializer(mul.input[1])
            int_in = mul.input[0]
            idt = model.get_tensor_datatype(int_in)
            if mt.op_type != "MultiThreshold" or scale is None or scale.size != 1:
                continue
            if not idt.is_integer() or len(model.find_consumers(mul.output[0]) or []) != 1:
                continue
            thr = model.get_initializer(mt.input[1])
            inst = getCustomOp(mt)
            if thr is None or thr.shape[0] != 1 or inst.get_nodeattr("out_scale") != 1.0:
                continue
            values = np.arange(int(idt.min()), int(idt.max()) + 1, dtype=np.int64)
            x = torch.tensor(values, dtype=torch.float32) * torch.tensor(
                float(scale.reshape(-1)[0]), dtype=torch.float32
            )
            g = torch.nn.functional.gelu(x).numpy()
            table = _count(g, thr[0].astype(np.float32)) + int(inst.get_nodeattr("out_bias"))
            i_min = int(np.argmin(table))
            up_thr, down_thr = [], []
            for k in range(1, len(values)):
                step = int(table[k] - table[k - 1])
                at = float(values[k]) - 0.5
                if k > i_min and step > 0:
                    up_thr += [at] * step
                elif k <= i_min and step < 0:
                    down_thr += [at] * (-step)
                elif step != 0:
                    raise ValueError(
                        f"GeluToThresholds: table of {gelu.name} is not unimodal at {values[k]}"
                    )
            # down(i) counts the falls passed, so the table is base + up(i) - down(i)
            base = int(table[0])
            out = mt.output[0]
            out_dt = model.get_tensor_datatype(out)
            idx = list(graph.node).index(gelu)
            parts = []
            for tag, t in (("up", up_thr), ("down", down_thr)):
                if not t:
                    continue
                name = f"{gelu.name}_{tag}"
                tname = model.make_new_valueinfo_name()
                model.set_initializer(tname, np.array([t], dtype=np.float32))
                o = model.make_new_valueinfo_name()
                node = helper.make_node(
                    "MultiThreshold",
                    [int_in, tname],
                    [o],
                    domain="qonnx.custom_op.general",
                    name=name,
                    out_dtype=DataType.get_smallest_possible(len(t)).name,
                    out_scale=1.0,
                    out_bias=0.0,
                    data_layout=inst.get_nodeattr("data_layout"),
                )
                graph.node.insert(idx, node)
                idx += 1
                model.set_tensor_datatype(o, DataType.get_smallest_possible(len(t)))
                model.set_tensor_shape(o, model.get_tensor_shape(int_in))
                parts.append((tag, o))
            cur = None
            for tag, o in parts:
                if cur is None and tag == "up":
                    cur = o
                    continue
                nxt = model.make_new_valueinfo_name()
                if cur is None:  # only a falling part: base - down
                    neg = model.make_new_valueinfo_name()
                    model.set_initializer(neg, np.array(-1.0, dtype=np.float32))
                    model.set_tensor_datatype(neg, DataType["INT2"])
                    graph.node.insert(idx, helper.make_node("Mul", [o, neg], [nxt]))
                else:
                    graph.node.insert(idx, helper.make_node("Sub", [cur, o], [nxt]))
                idx += 1
                model.set_tensor_shape(nxt, model.get_tensor_shape(int_in))
                cur = nxt
            bname = model.make_new_valueinfo_name()
            model.set_initializer(bname, np.array(float(base), dtype=np.float32))
            # integer annotation: the Add stays an integer op (FINN then sizes it exactly)
            model.set_tensor_datatype(bname, DataType.get_smallest_possible(base))
            graph.node.insert(idx, helper.make_node("Add", [cur, bname], [out]))
            model.set_tensor_datatype(out, out_dt)
            for dead in (mul, gelu, mt):
                graph.node.remove(dead)
            model = model.transform(InferShapes())
            model = model.transform(InferDataTypes())
            model = model.transform(GiveUniqueNodeNames())
            return model, True
        return model, False


def is_gelu_table_op(model: ModelWrapper, node) -> bool:
    """True for the Sub / Add / Mul(-1) nodes :class:`GeluToThresholds` creates.

    Used as the filter of finn-plus's ``InferElementwiseBinaryOperation`` so that these
    integer nodes become HW layers (with exactly sized output types) *before* the MVAU
    conversion looks at the datatype of the MatMul they feed.
    """
    if node.op_type == "Mul":
        const = [model.get_initializer(i) for i in node.input]
        if not any(
            c is not None and c.size == 1 and float(c.reshape(-1)[0]) == -1.0 for c in const
        ):
            return False
    if node.op_type in ("Sub", "Mul"):
        prods = [model.find_producer(i) for i in node.input if model.get_initializer(i) is None]
        return bool(prods) and all(p is not None and p.op_type == "MultiThreshold" for p in prods)
    if node.op_type == "Add":
        p = model.find_producer(node.input[0])
        if p is None:
            return False
        if p.op_type in ("ElementwiseSub", "ElementwiseMul"):
            return True
        return p.op_type in ("Sub", "Mul") and is_gelu_table_op(model, p)
    return False


def integer_thresholds(thresholds: np.ndarray) -> np.ndarray:
    """Thresholds on an integer input as integers (float64): ``x >= t <=> x >= ceil(t)``."""
    return np.ceil(np.asarray(thresholds, dtype=np.float64))


#: Float32 thresholds FINN computes for the same real threshold differ by a few units in
#: the last place; rows closer than this (relative to the largest |threshold|) to an
#: integer shift of each other are taken to be one: 2^-17 (8 float32 ulps).
SHIFT_REL_TOL = 2.0**-17


@dataclass(frozen=True)
class SharedRow:
    """Per-channel thresholds as one shared row + integer shifts.

    Attributes:
        row: (N,) the shared integer thresholds.
        shifts: (C,) integer shift of each channel: channel c's thresholds are
            ``row + shifts[c]``.
        snapped: threshold entries whose ceil()ed value was moved by one to match the
            row (0: the rewrite is exact; see :func:`shared_row_and_shifts`).
    """

    row: np.ndarray
    shifts: np.ndarray
    snapped: int

    @property
    def per_channel(self) -> np.ndarray:
        """(C, N) integer thresholds ``row + shifts[c]``."""
        return self.row[None, :] + self.shifts[:, None]


def shared_row_and_shifts(
    thresholds: np.ndarray, rel_tol: float = SHIFT_REL_TOL
) -> SharedRow | None:
    """Split per-channel thresholds on an integer input into one row + integer shifts.

    In exact arithmetic the thresholds of a quantizer after a linear layer whose bias
    lies on the accumulator grid are ``tau_i - n_c`` (``n_c`` the integer bias). FINN
    computes them in float32, so the rows agree only to a few ulps; where ``tau_i`` lies
    within that noise of an integer, ``ceil`` can land on either side in different
    channels. Each channel's shift is the median row difference, rounded; the rows match
    when every column's spread after removing the shifts is within ``rel_tol`` x the
    largest |threshold|. The shared row takes each column's majority ceil()ed value; the
    entries that differed (``snapped``) change the layer's output only for accumulator
    values equal to that threshold, by one step, which the float32 arithmetic of
    the reference cannot resolve either.

    Args:
        thresholds: (C, N) MultiThreshold thresholds, C >= 2.

    Returns:
        :class:`SharedRow`, or None when the rows are not integer shifts of one row.
        With ``snapped == 0``, ``count(x >= thresholds[c]) == count(x - shifts[c] >=
        row)`` for every integer x.
    """
    if thresholds.ndim != 2 or thresholds.shape[0] < 2:
        return None
    t = np.asarray(thresholds, dtype=np.float64)
    if not np.all(np.isfinite(t)):
        return None
    shifts = np.round(np.median(t - t[:1], axis=1))
    u = t - shifts[:, None]
    tol = rel_tol * max(1.0, float(np.abs(t).max()))
    if np.any(u.max(axis=0) - u.min(axis=0) > tol):
        return None
    c = np.ceil(u)
    hi = c.max(axis=0)
    row = np.where(2 * (c == hi).sum(axis=0) >= c.shape[0], hi, hi - 1)
    return SharedRow(row=row, shifts=shifts, snapped=int((c != row[None, :]).sum()))


class SharedThresholdTable(Transformation):
    """Per-channel threshold rows that are integer shifts of one row: snap them to exact
    shifts, or rewrite them as an integer bias plus one shared table.

    A quantizer after a linear layer whose bias lies on the accumulator grid
    (:class:`finn_flow.quant_model.QuantSpec` ``int_bias``) streamlines into a
    MultiThreshold on the integer accumulator with one threshold row per channel, each
    row the same row shifted by the channel's integer bias (up to float32 noise, see
    :func:`shared_row_and_shifts`). finn-plus's thresholding layer would store all C
    rows.

    - ``rewrite=False`` (snap): the rows are replaced by exact integer shifts of the
      shared row (``row + shifts[c]``), the node stays a per-channel MultiThreshold.
      Run it right after streamlining, so that later passes that read the rows (the MoE
      engine's integer expert bias) find exact shifts.
    - ``rewrite=True``: ``accumulator -> Add(-shifts[c]) (integer, per channel) ->
      MultiThreshold(row)``; the Add becomes an integer elementwise-add layer (C
      constants) and the thresholding layer's generator emits one table per PE instead
      of C rows. Exact for integer inputs once the rows are exact shifts.

    Only MultiThresholds on an integer input with channels last (``NWC`` / ``NHWC`` /
    ``NC``) and at least ``min_steps`` thresholds per channel are touched. Afterwards
    ``self.rewritten`` lists ``(output tensor, channels, snapped entries)`` (node names
    change: the pass gives every node a unique name at the end).
    """

    def __init__(self, rewrite: bool = True, min_steps: int = 2) -> None:
        super().__init__()
        self.rewrite = rewrite
        self.min_steps = min_steps
        self.rewritten: list[tuple[str, int, int]] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        """Process every matching MultiThreshold in one pass; returns (model, False)."""

        graph = model.graph
        for node in list(graph.node):
            if node.op_type != "MultiThreshold":
                continue
            idt = model.get_tensor_datatype(node.input[0])
            thr = model.get_initializer(node.input[1])
            inst = getCustomOp(node)
            if thr is None or not idt.is_integer() or thr.shape[-1] < self.min_steps:
                continue
            if inst.get_nodeattr("data_layout") not in ("NWC", "NHWC", "NC"):
                continue
            split = shared_row_and_shifts(thr)
            if split is None:
                continue
            self.rewritten.append((node.output[0], int(thr.shape[0]), split.snapped))
            if not self.rewrite:
                model.set_initializer(node.input[1], split.per_channel.astype(np.float32))
                continue
            model.set_initializer(node.input[1], split.row[None, :].astype(np.float32))
            if not split.shifts.any():  # identical rows: one row is enough
                continue
            neg = (-split.shifts).astype(np.float32)
            cname = model.make_new_valueinfo_name()
            model.set_initializer(cname, neg)
            lo, hi = int(neg.min()), int(neg.max())
            model.set_tensor_datatype(
                cname, DataType.get_smallest_possible(lo if -lo > hi else -hi - 1)
            )
            shifted = model.make_new_valueinfo_name()
            add = helper.make_node("Add", [node.input[0], cname], [shifted])
            graph.node.insert(list(graph.node).index(node), add)
            model.set_tensor_shape(shifted, model.get_tensor_shape(node.input[0]))
            model.set_tensor_datatype(shifted, DataType["INT32"])
            node.input[0] = shifted
        if self.rewritten and self.rewrite:
            model = model.transform(InferShapes())
            model = model.transform(InferDataTypes())
            model = model.transform(GiveUniqueNodeNames())
        return model, False


class IntegerBiasBeforeScale(Transformation):
    """``Add(Mul(acc, s), c)`` with ``c / s`` integer -> ``Mul(Add(acc, c / s), s)``.

    A linear layer whose bias lies on its accumulator grid but whose output goes on in
    float (the attention output projection and the dense fc2, summed into the residual
    stream) streamlines into an integer accumulator, a scalar dequantisation ``Mul`` and a
    per-channel float bias ``Add``. Moving the bias before the scale makes it an integer
    add of the accumulator (a narrow integer adder instead of a float32 one); the value is
    the same up to float32 rounding of the final product (``(acc + n) * s`` instead of
    ``acc * s + n * s``). Only applied when ``acc`` is an integer tensor, ``s`` a positive
    scalar constant read by this Mul alone and ``c / s`` within ``rel_tol`` of integers
    (relative to its largest magnitude). ``self.moved`` lists the Add outputs afterwards.
    """

    def __init__(self, rel_tol: float = SHIFT_REL_TOL) -> None:
        super().__init__()
        self.rel_tol = rel_tol
        self.moved: list[str] = []

    def apply(self, model: ModelWrapper) -> tuple[ModelWrapper, bool]:
        """Move every matching bias in one pass; returns (model, False)."""
        graph = model.graph
        for add in list(graph.node):
            if add.op_type != "Add" or len(add.input) != 2:
                continue
            c = model.get_initializer(add.input[1])
            mul = model.find_producer(add.input[0])
            if c is None or mul is None or mul.op_type != "Mul":
                continue
            s = model.get_initializer(mul.input[1])
            acc = mul.input[0]
            if s is None or s.size != 1 or float(s.reshape(-1)[0]) <= 0:
                continue
            if not model.get_tensor_datatype(acc).is_integer():
                continue
            if len(model.find_consumers(mul.output[0]) or []) != 1:
                continue
            n = np.asarray(c, dtype=np.float64) / float(s.reshape(-1)[0])
            tol = self.rel_tol * max(1.0, float(np.abs(n).max()))
            if np.any(np.abs(n - np.round(n)) > tol):
                continue
            n = np.round(n).astype(np.float32)
            lo, hi = int(n.min()), int(n.max())
            nname = model.make_new_valueinfo_name()
            model.set_initializer(nname, n)
            model.set_tensor_datatype(
                nname, DataType.get_smallest_possible(lo if -lo > hi else -hi - 1)
            )
            shifted = model.make_new_valueinfo_name()
            out, dead = add.output[0], mul.output[0]
            new_add = helper.make_node("Add", [acc, nname], [shifted])
            graph.node.insert(list(graph.node).index(mul), new_add)
            model.set_tensor_shape(shifted, model.get_tensor_shape(acc))
            model.set_tensor_datatype(shifted, DataType["INT32"])
            mul.input[0] = shifted
            mul.output[0] = out
            graph.node.remove(add)
            for vi in [v for v in graph.value_info if v.name == dead]:
                graph.value_info.remove(vi)
            self.moved.append(out)
        if self.moved:
            model = model.transform(InferShapes())
            model = model.transform(InferDataTypes())
            model = model.transform(GiveUniqueNodeNames())
        return model, False
