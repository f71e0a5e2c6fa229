"""Small graph transformations the M3ViT pathway needs on top of finn-plus's own.

All of them keep the graph's function unchanged (they only move or copy constant
scale nodes), so the Python execution before and after is identical.
"""

from __future__ import annotations

import copy

from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.base import Transformation


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
