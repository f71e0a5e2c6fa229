"""M3ViT backbone: ViT with mixture-of-experts FFNs on every other block (docs/model.md s. 1).

Parameter names follow the timm ViT layout (``patch_embed.proj``, ``cls_token``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``) so dense
weights load by name; MoE blocks hold ``blocks.N.moe.{w1,b1,w2,b2,router.*}`` instead of
``mlp``. No final LayerNorm (each task head has its own). The task names are saved with
the weights (``_extra_state``) and routers load by task name (:mod:`..task_order`);
ImageNet initialisation lives in :mod:`.pretrained`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import Tensor, nn

from ..fast_layer_norm import layer_norm_autocast
from ..moe import ROUTER_VARIANTS, MoEFFN, MoERouting
from ..task_order import TaskNamesMixin, attach_task_names
from .pos_embed import resize_pos_embed
from .pretrained import load_timm_checkpoint

EXPERT_INIT_MODES = ("split", "random")


class M3ViTOutput(NamedTuple):
    """What the backbone returns (docs/design.md, model contract).

    Attributes:
        tokens: (B, 1+N, D) output of the last block, CLS first, no final norm.
        grid: (h, w) patch grid, N = h * w.
        balance_loss: scalar float32 tensor, unweighted sum over MoE layers and router
            calls of cv2(importance) + cv2(load); 0 in eval mode.
        routing: one :class:`MoERouting` per MoE layer (expert ids / gates per token,
            flattened in (b, n) order), for analysis tools.
    """

    tokens: Tensor
    grid: tuple[int, int]
    balance_loss: Tensor
    routing: list[MoERouting]


class Attention(nn.Module):
    """Multi-head self-attention with a fused qkv projection (timm layout)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (B, N, D) -> (B, N, D)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    """Dense FFN ``fc2(GELU(fc1(x)))`` (timm layout)."""

    def __init__(self, dim: int, hidden_dims: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dims)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dims, dim)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., D) -> (..., D)."""
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block; the FFN is a dense :class:`Mlp` or an :class:`MoEFFN`."""

    def __init__(
        self, dim: int, num_heads: int, mlp_hidden: int, eps: float, moe: MoEFFN | None
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        if moe is None:
            self.mlp = Mlp(dim, mlp_hidden)
        else:
            self.moe = moe

    @property
    def is_moe(self) -> bool:
        """True when the FFN is a mixture of experts."""
        return hasattr(self, "moe")

    def forward(
        self, x: Tensor, task_ids: Tensor | None
    ) -> tuple[Tensor, MoERouting | None, Tensor | None]:
        """x (B, N, D) -> (x, routing or None, balance loss or None)."""
        return self.feed_forward(self.attend(x), task_ids)

    def attend(self, x: Tensor) -> Tensor:
        """The attention half: x (B, N, D) -> x + attn(norm1(x)), (B, N, D)."""
        return x + self.attn(_norm(self.norm1, x))

    def feed_forward(
        self, x: Tensor, task_ids: Tensor | None, repeat: int = 1
    ) -> tuple[Tensor, MoERouting | None, Tensor | None]:
        """The FFN half: x (B, N, D) -> x + ffn(norm2(x)), (repeat*B, N, D).

        ``repeat`` > 1 normalises the B samples once and repeats them (and the residual)
        ``repeat`` times along the batch before the FFN, for ``task_ids`` of length
        ``repeat*B``: the task-batched pass shares everything before the first router.
        """
        h = _norm(self.norm2, x)
        if repeat > 1:
            x, h = x.repeat(repeat, 1, 1), h.repeat(repeat, 1, 1)
        if not self.is_moe:
            return x + self.mlp(h), None, None
        y, routing, loss = self.moe(h, task_ids)
        return x + y, routing, loss


def _norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    """``norm(x)``; under CUDA autocast (inference and training) written directly in
    the autocast dtype that its matmul consumers cast to (:mod:`..fast_layer_norm`)."""
    y = layer_norm_autocast(norm, x)
    return norm(x) if y is None else y


def _pair(v: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(v)
    if len(v) != 2:
        raise ValueError(f"{name} must be an int or (h, w), got {v}")
    return (int(v[0]), int(v[1]))


@MODELS.register_module()
class M3ViT(TaskNamesMixin, BaseModule):
    """Vision Transformer with task-routed MoE feed-forward layers.

    Args:
        tasks: task names, in the order that defines task indices (the segmentor fills
            this from its heads). Required (non-empty) for 'multi_gate' and
            'task_conditioned'; optional for 'shared'.
        img_size: (H, W) the position embeddings are stored for (any input whose sides
            are multiples of ``patch_size`` also works: they are resized on the fly).
        patch_size: patch side in pixels.
        in_channels: image channels.
        embed_dims: D. num_layers: blocks. num_heads: attention heads (must divide D).
        mlp_ratio: dense MLP hidden = mlp_ratio * D.
        moe_layers: indices of MoE blocks; default every other block 1, 3, ..., i.e.
            ``range(1, num_layers, 2)``.
        num_experts: E. top_k: experts per token. expert_hidden_dims: Hd (default D).
        router: 'multi_gate' (one router per task), 'task_conditioned' or 'shared'.
        task_embed_dims: g of the task-conditioned router's task MLP.
        noise_std: router noise std (scaled by 1/E), training only; 0 in the paper.
        dispatch: MoE dispatch implementation ('auto', 'sorted', or a registered one).
        norm_eps: LayerNorm eps.
        pretrained: path of a local timm-layout ViT/DeiT state dict loaded by
            :meth:`init_weights` (:func:`.pretrained.load_timm_checkpoint`;
            ``init_cfg=dict(type='Pretrained', checkpoint=...)`` is accepted as a
            synonym). Nothing is ever downloaded.
        expert_init: how experts are initialised from the pretrained dense MLP:
            'split': the dense hidden units (mlp_ratio*D, e.g. 1536) are cut into
            G = dense_hidden / Hd contiguous groups (4 groups of 384); expert e takes
            group ``e % G`` (16 experts: each group used by 4 experts, cycling), with
            ``b2 = fc2.bias / G`` so that the sum of experts 0..G-1 equals the dense MLP.
            That equivalence is about the weights only: at init a MoE layer computes
            ``sum_j p_j * expert_{i_j}(x)`` over the router's top-k experts i_j with
            their softmax probabilities p_j (not renormalised), with random routers,
            so it is not the dense MLP (each expert is one group, a 1/G share of it;
            the chosen experts may repeat a group; the p_j sum to less than 1).
            'random': experts keep their random init; the dense MLP is dropped.
    """

    def __init__(
        self,
        tasks: Sequence[str] | None = None,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_channels: int = 3,
        embed_dims: int = 384,
        num_layers: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        moe_layers: Sequence[int] | None = None,
        num_experts: int = 16,
        top_k: int = 4,
        expert_hidden_dims: int | None = None,
        router: str = "multi_gate",
        task_embed_dims: int = 64,
        noise_std: float = 0.0,
        dispatch: str = "auto",
        norm_eps: float = 1e-6,
        pretrained: str | None = None,
        expert_init: str = "split",
        init_cfg: dict | None = None,
    ) -> None:
        if isinstance(init_cfg, dict) and init_cfg.get("type") == "Pretrained":
            if pretrained is not None:
                raise ValueError("give either pretrained or init_cfg=dict(type='Pretrained')")
            pretrained, init_cfg = init_cfg.get("checkpoint"), None
        super().__init__(init_cfg=init_cfg)
        self.tasks = list(tasks) if tasks is not None else []
        if router not in ROUTER_VARIANTS:
            raise ValueError(
                f"unknown router variant {router!r}; choose one of {list(ROUTER_VARIANTS)}"
            )
        if router != "shared" and not self.tasks:
            raise ValueError(f"router={router!r} needs a non-empty task list, got {tasks!r}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks {self.tasks} repeats a task")
        if embed_dims % num_heads != 0:
            raise ValueError(f"num_heads={num_heads} does not divide embed_dims={embed_dims}")
        if expert_init not in EXPERT_INIT_MODES:
            raise ValueError(
                f"unknown expert_init {expert_init!r}; choose one of {list(EXPERT_INIT_MODES)}"
            )
        moe_layers = list(range(1, num_layers, 2)) if moe_layers is None else list(moe_layers)
        bad = [i for i in moe_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"moe_layers {bad} out of range for num_layers={num_layers}")
        self.img_size = _pair(img_size, "img_size")
        if any(s % patch_size for s in self.img_size):
            raise ValueError(f"img_size {self.img_size} must be a multiple of patch {patch_size}")
        self.patch_size, self.embed_dims = patch_size, embed_dims
        self.router_variant, self.expert_init = router, expert_init
        self.pretrained = pretrained
        self.moe_layers = sorted(set(moe_layers))
        self.pos_grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        mlp_hidden = int(embed_dims * mlp_ratio)
        hd = embed_dims if expert_hidden_dims is None else expert_hidden_dims

        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_channels, embed_dims, patch_size, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims))
        num_pos = 1 + self.pos_grid[0] * self.pos_grid[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_pos, embed_dims))
        blocks = []
        for i in range(num_layers):
            moe = None
            if i in self.moe_layers:
                moe = MoEFFN(
                    embed_dims,
                    hd,
                    num_experts,
                    top_k,
                    router=router,
                    num_tasks=max(len(self.tasks), 1),
                    task_embed_dims=task_embed_dims,
                    noise_std=noise_std,
                    dispatch=dispatch,
                )
            blocks.append(Block(embed_dims, num_heads, mlp_hidden, norm_eps, moe))
        self.blocks = nn.ModuleList(blocks)
        self._reset_dense_parameters()
        attach_task_names(self)

    # ------------------------------------------------------------------ init / loading
    def _reset_dense_parameters(self) -> None:
        """timm ViT init: every ``nn.Linear`` trunc-normal std 0.02, zero biases,
        LayerNorms at identity; position embeddings and CLS std 0.02. The experts are
        initialised by :class:`MoEFFN` itself, with the same distribution. Router gates
        then get the authors' ``kaiming_uniform_(a=sqrt(5))``
        (:func:`..moe.routers.init_gate_`, uniform in +-1/sqrt(E)); the task-conditioned
        router's task MLP keeps trunc-normal 0.02, as in the authors' code."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for block in self.blocks:
            if block.is_moe and hasattr(block.moe.router, "reset_parameters"):
                block.moe.router.reset_parameters()

    def init_weights(self) -> None:
        """Load ``pretrained`` (if set) on top of the random init done at construction
        (:func:`~.pretrained.load_timm_checkpoint`)."""
        if self.pretrained:
            load_timm_checkpoint(self, self.pretrained)
        elif self.init_cfg is not None:
            super().init_weights()

    def task_indexed_parameters(self) -> dict[str, int]:
        """``{name: task axis}`` of the routers' task-indexed parameters (the rows that
        load by task name, :mod:`..task_order`)."""
        out = {}
        for i, block in enumerate(self.blocks):
            if block.is_moe:
                router = block.moe.router
                for name, axis in getattr(router, "TASK_AXES", {}).items():
                    out[f"blocks.{i}.moe.router.{name}"] = axis
        return out

    # ------------------------------------------------------------------ forward
    @property
    def first_moe_layer(self) -> int:
        """Index of the first MoE block (num_layers when there is none)."""
        return self.moe_layers[0] if self.moe_layers else len(self.blocks)

    def task_ids(
        self, task: str | Tensor | None, batch_size: int, device: torch.device
    ) -> Tensor | None:
        """Resolve ``task`` to per-sample indices (B,) long, or None for the shared router.

        ``task``: a task name (whole batch), a (B,) long tensor of indices into
        ``self.tasks``, or None (shared router only).
        """
        if task is None:
            if self.router_variant != "shared":
                raise ValueError(
                    f"router={self.router_variant!r} needs a task; choose from {self.tasks}"
                )
            return None
        if isinstance(task, str):
            if self.tasks and task not in self.tasks:
                raise ValueError(f"unknown task {task!r}; valid tasks are {self.tasks}")
            if self.router_variant == "shared":
                return None
            return torch.full(
                (batch_size,), self.tasks.index(task), dtype=torch.long, device=device
            )
        if not isinstance(task, Tensor) or task.dtype != torch.long or task.shape != (batch_size,):
            raise ValueError(
                f"task must be a name, None or a LongTensor of shape ({batch_size},), got {task!r}"
            )
        if self.router_variant == "shared":
            return None
        if task.numel() and (int(task.min()) < 0 or int(task.max()) >= len(self.tasks)):
            raise ValueError(f"task indices must be in [0, {len(self.tasks)}), got {task.tolist()}")
        return task.to(device)

    def embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """Patchify, prepend CLS, add position embeddings: (B,3,H,W) -> (B,1+N,D), (h,w)."""
        if x.dim() != 4:
            raise ValueError(f"input must be (B, C, H, W), got shape {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                f"pad it (e.g. the data preprocessor's size_divisor={self.patch_size})"
            )
        grid = (h // self.patch_size, w // self.patch_size)
        tokens = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(tokens.dtype)
        pos = resize_pos_embed(self.pos_embed, self.pos_grid, grid)
        return torch.cat([cls, tokens], dim=1) + pos.to(tokens.dtype), grid

    def forward_blocks(
        self, x: Tensor, task_ids: Tensor | None, start: int = 0, end: int | None = None
    ) -> tuple[Tensor, list[MoERouting], Tensor]:
        """Run blocks[start:end]: x (B,1+N,D) -> (x, routing of MoE blocks, balance loss)."""
        routing: list[MoERouting] = []
        loss = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks[start:end]:
            x, r, layer_loss = block(x, task_ids)
            if r is not None:
                routing.append(r)
                if self.training:  # layers return 0 in eval: no add launches there
                    loss = loss + layer_loss
        return x, routing, loss

    def forward(self, x: Tensor, task: str | Tensor | Sequence[str] | None = None) -> M3ViTOutput:
        """Run the backbone for ``task``.

        Args:
            x: (B, 3, H, W) normalised images, H and W multiples of ``patch_size``.
            task: a task name (one task for the whole batch), a (B,) LongTensor of
                indices into ``tasks`` (a batch mixing tasks), None (shared router), or a
                list of task names: the task-batched pass of :meth:`forward_tasks`
                (tokens (T*B, 1+N, D), task-major).
        """
        if isinstance(task, (list, tuple)):
            return self.forward_tasks(x, task)
        tokens, grid = self.embed(x)
        task_ids = self.task_ids(task, x.shape[0], x.device)
        tokens, routing, loss = self.forward_blocks(tokens, task_ids)
        return M3ViTOutput(tokens, grid, loss, routing)

    def forward_tasks(self, x: Tensor, tasks: Sequence[str]) -> M3ViTOutput:
        """Task-batched pass for several tasks at once (same result as one pass per task).

        Everything before the first router runs once on the B images (the blocks before
        the first MoE layer, then that layer's attention and second LayerNorm); the
        result is repeated T times and the rest runs on T*B samples with per-sample task
        ids. Returns tokens of shape (T*B, 1+N, D), task-major: rows ``t*B:(t+1)*B`` are
        task ``tasks[t]``. The balance loss sums each task's router calls, as T separate
        passes would.
        """
        if not tasks:
            raise ValueError(f"tasks is empty; choose from {self.tasks}")
        for t in tasks:
            if t not in self.tasks:
                raise ValueError(f"unknown task {t!r}; valid tasks are {self.tasks}")
        if self.router_variant == "shared":
            out = self.forward(x, None)
            return out._replace(tokens=out.tokens.repeat(len(tasks), 1, 1))
        b = x.shape[0]
        tokens, grid = self.embed(x)
        start = self.first_moe_layer
        tokens, _, zero = self.forward_blocks(tokens, None, 0, start)
        if start == len(self.blocks):  # no MoE layer: one pass serves every task
            return M3ViTOutput(tokens.repeat(len(tasks), 1, 1), grid, zero, [])
        # filled on the device: a tensor from a Python list would be a host-to-device
        # copy that waits for the GPU queue to drain, every training step
        task_ids = torch.cat(
            [
                torch.full((b,), self.tasks.index(t), dtype=torch.long, device=x.device)
                for t in tasks
            ]
        )
        first = self.blocks[start]
        tokens, first_routing, first_loss = first.feed_forward(
            first.attend(tokens), task_ids, repeat=len(tasks)
        )
        tokens, routing, loss = self.forward_blocks(tokens, task_ids, start + 1)
        if self.training:
            loss = first_loss + loss
        return M3ViTOutput(tokens, grid, loss, [first_routing, *routing])
