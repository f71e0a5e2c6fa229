"""Mixture-of-experts building blocks: routers, V-MoE gating, balance loss, dispatch."""

from .dispatch import DISPATCH_IMPLS, auto_dispatch, get_dispatch
from .gating import GateOutput, balance_loss, check_moe_sizes, cv_squared, vmoe_top_k
from .moe_ffn import MoEFFN, MoERouting
from .reference import sorted_dispatch
from .routers import (
    ROUTER_VARIANTS,
    MultiGateRouter,
    SharedRouter,
    TaskConditionedRouter,
    build_router,
)

__all__ = [
    "DISPATCH_IMPLS",
    "GateOutput",
    "MoEFFN",
    "MoERouting",
    "MultiGateRouter",
    "ROUTER_VARIANTS",
    "SharedRouter",
    "TaskConditionedRouter",
    "auto_dispatch",
    "balance_loss",
    "build_router",
    "check_moe_sizes",
    "cv_squared",
    "get_dispatch",
    "sorted_dispatch",
    "vmoe_top_k",
]
