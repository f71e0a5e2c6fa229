"""The graph passes of the M3ViT build that may run on pieces of the graph.

Each pass is ``(model, cfg) -> model`` on a QONNX/FINN ``ModelWrapper`` and works node
by node or pattern by pattern, so it gives the same result on the pieces of a graph cut
at its residual stream as on the whole graph (:mod:`finn_flow.pieces`). The build steps
(:mod:`finn_flow.steps`) run them on the whole graph or on pieces in worker processes;
a worker looks them up by name in :data:`PIECE_PASSES`.

Import this module only after :func:`finn_flow.finn_env.start_finn` (finn-plus reads
its settings at import).
"""

from __future__ import annotations

from collections.abc import Callable

import finn.builder.build_dataflow_steps as fs
from finn.builder.build_dataflow_config import DataflowBuildConfig
from finn.transformation.fpgadataflow.attention import InferScaledDotProductAttention
from finn.transformation.fpgadataflow.convert_to_hw.elementwise_binary_operation import (
    InferElementwiseBinaryOperation,
)
from finn.transformation.fpgadataflow.convert_to_hw.pwpolyf import InferPWPolyFLayer
from finn.transformation.fpgadataflow.convert_to_hw.upsample import InferUpsample
from finn.transformation.streamline.absorb import (
    AbsorbConsecutiveTransposes,
    AbsorbScalarBiasIntoMultiThreshold,
    AbsorbTransposeIntoMultiThreshold,
)
from finn.transformation.streamline.extract_norm_scale_bias import ExtractNormScaleBias
from finn.transformation.streamline.reorder import MakeScaleResizeNHWC
from qonnx.core.modelwrapper import ModelWrapper
from qonnx.transformation.general import GiveUniqueNodeNames
from qonnx.transformation.infer_data_layouts import InferDataLayouts

import finn_flow.moe_ops  # noqa: F401  (pieces may hold the MoE engine's ops)
from finn_flow.transforms import (
    DuplicateForkedConstMul,
    ExtractMultiThresholdScaleBiasOnce,
    GeluToThresholds,
    MultiThresholdOutputTypes,
    is_gelu_table_op,
)

#: A graph pass: (model, build config) -> model.
GraphPass = Callable[[ModelWrapper, DataflowBuildConfig], ModelWrapper]


def qonnx_to_finn(model: ModelWrapper, cfg: DataflowBuildConfig) -> ModelWrapper:
    """FINN's QONNX-to-FINN conversion and tidy-up, then the signed quantizers' offset
    ``Add`` absorbed into their thresholds (FINN's streamlining starts with the same
    transform; done here so that a residual quantizer's output is a proper signed
    integer stream where the graph is cut into pieces)."""
    model = fs.step_tidy_up(fs.step_qonnx_to_finn(model, cfg), cfg)
    return model.transform(AbsorbScalarBiasIntoMultiThreshold())


def streamline(model: ModelWrapper, cfg: DataflowBuildConfig) -> ModelWrapper:
    """GELU to PWPolyF (before streamlining breaks its pattern), scale/bias split out of
    thresholds and norms, FINN's streamlining, the head's layout transposes moved past its
    nearest-neighbour upsamplings, forked scales un-merged, streamlining again, and GELU
    as exact integer threshold tables (:class:`~finn_flow.transforms.GeluToThresholds`)."""
    model = model.transform(InferPWPolyFLayer())
    model = model.transform(ExtractMultiThresholdScaleBiasOnce())
    model = model.transform(ExtractNormScaleBias())
    model = fs.step_streamline(model, cfg)
    if model.get_nodes_by_op_type("Resize"):
        # head: move the NCHW<->NHWC transposes of the lowered convs past the
        # nearest-neighbour Resize nodes so that they cancel (all NHWC streams)
        for _ in range(4):  # a chain of k Resize nodes needs k rounds
            model = model.transform(InferDataLayouts())
            model = model.transform(MakeScaleResizeNHWC())
            model = model.transform(AbsorbConsecutiveTransposes())
            model = model.transform(AbsorbTransposeIntoMultiThreshold())
            model = model.transform(AbsorbConsecutiveTransposes())
    model = model.transform(DuplicateForkedConstMul())
    model = fs.step_streamline(model, cfg)
    model = model.transform(InferDataLayouts())
    return model.transform(GeluToThresholds())


def convert_to_hw(model: ModelWrapper, cfg: DataflowBuildConfig) -> ModelWrapper:
    """HW-layer conversion: threshold outputs typed by the range they emit
    (:class:`~finn_flow.transforms.MultiThresholdOutputTypes`), the attention pattern
    (before its parts are converted one by one), then the integer GELU-table arithmetic
    (so that the MatMuls after it see exact integer types), the head's upsamplers, then
    FINN's own conversion."""
    model = model.transform(MultiThresholdOutputTypes())
    model = model.transform(InferScaledDotProductAttention())
    model = model.transform(InferElementwiseBinaryOperation(is_gelu_table_op))
    model = model.transform(InferUpsample())  # head: Resize(nearest) -> HW upsampler
    model = model.transform(GiveUniqueNodeNames())
    return fs.step_convert_to_hw(model, cfg)


def minimize_bit_width(model: ModelWrapper, cfg: DataflowBuildConfig) -> ModelWrapper:
    """FINN's ``step_minimize_bit_width`` (weights and accumulators to their ranges)."""
    return fs.step_minimize_bit_width(model, cfg)


#: The passes a piece worker can run, by name.
PIECE_PASSES: dict[str, GraphPass] = {
    "qonnx_to_finn": qonnx_to_finn,
    "streamline": streamline,
    "convert_to_hw": convert_to_hw,
    "minimize_bit_width": minimize_bit_width,
}
