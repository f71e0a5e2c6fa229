"""The reordered expert-by-expert MoE engine as finn-plus hardware ops.

Importing this package registers ``TopKGate``, ``ExpertDispatch``, ``ExpertFFN`` and
``ExpertCombine`` (domain ``finn.custom_op.fpgadataflow``) and their ``_hls`` variants
(``finn.custom_op.fpgadataflow.hls``) with finn-plus's op registries, the same way
finn-plus's own ops register (nothing in site-packages is edited). See README.md here and
docs/fpga.md for the engine, its schedule and its cycle model.
"""

# finn-plus registers some of its own HW ops (e.g. Reshape) only when its rtl package is
# imported; graphs holding them must execute in any process that imports this package
import finn.custom_op.fpgadataflow.rtl  # noqa: F401, I001

from finn_flow.moe_ops.combine import ExpertCombine, ExpertCombine_hls
from finn_flow.moe_ops.ddr import write_ddr_image
from finn_flow.moe_ops.dispatch import ExpertDispatch, ExpertDispatch_hls
from finn_flow.moe_ops.expert_ffn import ExpertFFN, ExpertFFN_hls
from finn_flow.moe_ops.topk_gate import TopKGate, TopKGate_hls
from finn_flow.moe_ops.transform import MoESwapError, replace_moe_standins

__all__ = [
    "ExpertCombine",
    "ExpertCombine_hls",
    "ExpertDispatch",
    "ExpertDispatch_hls",
    "ExpertFFN",
    "ExpertFFN_hls",
    "MoESwapError",
    "TopKGate",
    "TopKGate_hls",
    "replace_moe_standins",
    "write_ddr_image",
]
