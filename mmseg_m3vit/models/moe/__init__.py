"""Mixture-of-experts building blocks: routers, V-MoE gating, balance loss, dispatch."""

from .dispatch import DISPATCH_IMPLS, get_dispatch, register_dispatch, sorted_dispatch
from .gating import GateOutput, balance_loss, cv_squared, vmoe_top_k
from .moe_ffn import MoEFFN, MoERouting
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
    "balance_loss",
    "build_router",
    "cv_squared",
    "get_dispatch",
    "register_dispatch",
    "sorted_dispatch",
    "vmoe_top_k",
]
