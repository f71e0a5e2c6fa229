"""Multi-task segmentor: one M3ViT backbone, one head per task (docs/model.md s. 3-4)."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch.nn.functional as F
from mmengine.optim import OptimWrapper
from mmengine.structures import PixelData
from mmseg.models.segmentors.base import BaseSegmentor
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample
from mmseg.utils import add_prefix
from torch import Tensor, nn

from ...tasks import TASK_SPECS, check_tasks, dataset_tasks, resolve_tasks
from ..backbones.m3vit import M3ViTOutput
from ..losses import raise_label_errors


def task_head_configs(
    decode_heads: Mapping[str, Mapping],
    tasks: Sequence[str] | None = None,
    dataset: str | None = None,
    head_template: Mapping | None = None,
) -> dict[str, dict]:
    """The full head config of every task the segmentor builds, in task order.

    Each is ``head_template`` updated with ``decode_heads[task]`` (one level: a key of the
    task's entry replaces the template's), plus ``task`` and, when ``dataset`` is given
    and the entry sets none, ``num_classes`` from the task table. ``in_channels`` is left
    to the caller (the backbone's width). The task list is chosen as described by
    :func:`mmseg_m3vit.tasks.resolve_tasks`.

    Raises:
        ValueError: an unknown or missing task, or an entry whose ``task`` is another one.
    """
    if not decode_heads:
        raise ValueError("decode_heads is empty; give one head config per task")
    chosen = resolve_tasks(tasks, dataset, decode_heads, what="decode_heads")
    out = {}
    for task in chosen:
        cfg = copy.deepcopy(dict(head_template or {}))
        cfg.update(copy.deepcopy(dict(decode_heads[task])))
        if cfg.setdefault("task", task) != task:
            raise ValueError(f"decode_heads[{task!r}] has task={cfg['task']!r}")
        if dataset is not None:
            cfg.setdefault("num_classes", dataset_tasks(dataset)[task])
        out[task] = cfg
    return out


def model_head_configs(model: Mapping) -> dict[str, dict]:
    """:func:`task_head_configs` of a ``MultiTaskSegmentor`` config (``cfg.model``): the
    full head config of every task it builds, in task order; its keys are its tasks.

    Raises:
        KeyError: the config has no ``decode_heads``. ValueError: as
            :func:`task_head_configs`.
    """
    if not isinstance(model.get("decode_heads"), Mapping):
        raise KeyError("model.decode_heads (a dict keyed by task) is missing")
    return task_head_configs(
        model["decode_heads"], model.get("tasks"), model.get("dataset"), model.get("head_template")
    )


@MODELS.register_module()
class MultiTaskSegmentor(BaseSegmentor):
    """M3ViT multi-task segmentor with single-task inference.

    Call graph::

        loss(inputs, data_samples):               every task, every step
            extract_feat(inputs, tasks) -> {task: M3ViTOutput}, balance
                shared router:     backbone(inputs, None) once, all heads read it
                task_batched:      backbone(inputs, [tasks]) (forward_tasks): all before
                                   the first router once, the rest on T x B samples
                otherwise:         backbone(inputs, task) for each task (T passes)
            heads[task].loss(tokens, grid, data_samples) -> {'<task>.loss_*'} x weight
            [tam: per level, TaskAttentionModule(stage features of every head)
                  -> {'<task>.tam<level>_loss_*'} x weight x tam loss_weight]
            + {'loss_moe_balance': moe_balance_weight x balance}

        predict(inputs, data_samples, tasks=None):  tasks = argument or infer_tasks
            extract_feat(inputs, tasks)             only these tasks' routers run
            heads[task](tokens, grid, input size) -> predict_by_feat(img metas)
            -> data_sample.<pred_field> = PixelData at ori_shape (padding cropped)

        _forward(inputs, data_samples=None, tasks=None) -> {task: logits (B,C,H,W)}

    Args:
        backbone: M3ViT config; ``tasks`` is filled from the segmentor's tasks when absent
            and must name exactly those tasks when given.
        decode_heads: ``{task: head config}``: each task's own head settings (e.g. its
            ``loss_decode``), laid over ``head_template``. May hold more tasks than are
            built (one table for several data sets); ``task``, ``in_channels`` and, with
            ``dataset``, ``num_classes`` are filled in (see :func:`task_head_configs`).
        tasks: the tasks to build, in task-index order; default every task of
            ``dataset`` (task table order), else every key of ``decode_heads``.
        dataset: a data set of the task table (``'nyud'``, ``'pascal'``): the default
            task list and each head's ``num_classes``.
        head_template: settings shared by every task's head (type, channels, norm, ...).
        loss_weights: ``{task: weight}``; tasks not listed weigh 1.0; may name tasks that
            are not built.
        moe_balance_weight: factor of the summed balance loss (0.01).
        infer_tasks: tasks :meth:`predict` runs by default (all when None).
        task_batched: run the per-task passes of training as one batched pass (same
            losses and gradients). Default: on for multi_gate / task_conditioned routers
            (the shared router always runs a single pass).
        tam: None (default) or ``dict(levels=(0, 1, 2), loss_weight=1.0, **kwargs)``:
            a training-only :class:`TaskAttentionModule` per head stage level (kwargs
            such as ``channels``, ``norm_cfg`` go to it); its auxiliary predictions add
            losses only, inference never runs it. All heads must share ``channels``.
        train_cfg / test_cfg: accepted for mmseg config compatibility; unused.
        data_preprocessor: e.g. ``MultiTaskDataPreprocessor``.
    """

    def __init__(
        self,
        backbone: dict,
        decode_heads: dict[str, dict],
        tasks: Sequence[str] | None = None,
        dataset: str | None = None,
        head_template: dict | None = None,
        loss_weights: dict[str, float] | None = None,
        moe_balance_weight: float = 0.01,
        infer_tasks: Sequence[str] | None = None,
        task_batched: bool | None = None,
        tam: dict | None = None,
        train_cfg: dict | None = None,
        test_cfg: dict | None = None,
        data_preprocessor: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        head_cfgs = task_head_configs(decode_heads, tasks, dataset, head_template)
        self.tasks = list(head_cfgs)
        backbone = copy.deepcopy(dict(backbone))
        if backbone.get("tasks") is None:
            backbone["tasks"] = list(self.tasks)
        elif list(backbone["tasks"]) != self.tasks:
            raise ValueError(
                f"backbone tasks {list(backbone['tasks'])} differ from the segmentor's "
                f"tasks {self.tasks}; leave backbone.tasks unset"
            )
        self.backbone = MODELS.build(backbone)
        self.heads = nn.ModuleDict()
        for task, head_cfg in head_cfgs.items():
            head_cfg.setdefault("in_channels", self.backbone.embed_dims)
            self.heads[task] = MODELS.build(head_cfg)
        loss_weights = dict(loss_weights or {})
        check_tasks(loss_weights, sorted(TASK_SPECS), "loss_weights", allow_empty=True)
        self.loss_weights = {t: float(loss_weights.get(t, 1.0)) for t in self.tasks}
        self.moe_balance_weight = float(moe_balance_weight)
        self.infer_tasks = check_tasks(infer_tasks or self.tasks, self.tasks, "infer_tasks")
        self.shared = getattr(self.backbone, "router_variant", None) == "shared"
        self.task_batched = (not self.shared) if task_batched is None else bool(task_batched)
        self.train_cfg, self.test_cfg = train_cfg, test_cfg
        self._build_tam(tam)

    def _build_tam(self, tam: dict | None) -> None:
        self.tam_levels: list[int] = []
        self.tam_loss_weight = 0.0
        if tam is None:
            return
        cfg = dict(tam)
        levels = [int(v) for v in cfg.pop("levels", (0, 1, 2))]
        self.tam_loss_weight = float(cfg.pop("loss_weight", 1.0))
        channels = {t: getattr(h, "channels", None) for t, h in self.heads.items()}
        if len(set(channels.values())) != 1 or None in channels.values():
            raise ValueError(f"tam needs heads with equal conv channels, got {channels}")
        num_stages = min(h.num_up + 1 for h in self.heads.values())
        bad = [v for v in levels if not 0 <= v < num_stages]
        if bad or not levels:
            raise ValueError(f"tam levels {levels} must be in [0, {num_stages}) and non-empty")
        if len(self.tasks) < 2:
            raise ValueError(f"tam needs at least two tasks, got {self.tasks}")
        self.tam_levels = levels
        self.tam = nn.ModuleDict()
        for level in levels:
            self.tam[f"level{level}"] = MODELS.build(
                dict(
                    cfg,
                    type="TaskAttentionModule",
                    tasks=self.tasks,
                    in_channels=next(iter(channels.values())),
                    num_classes={t: h.num_classes for t, h in self.heads.items()},
                )
            )

    # ------------------------------------------------------------------ features
    def extract_feat(
        self, inputs: Tensor, tasks: Sequence[str] | None = None
    ) -> tuple[dict[str, M3ViTOutput], Tensor]:
        """Backbone features per task and the summed (unweighted) balance loss.

        inputs (B, 3, H, W) -> ``({task: M3ViTOutput with tokens (B, 1+N, D)}, scalar)``.
        """
        tasks = check_tasks(tasks if tasks is not None else self.tasks, self.tasks)
        b = inputs.shape[0]
        if self.shared:
            out = self.backbone(inputs, None)
            return {t: out for t in tasks}, out.balance_loss
        if self.task_batched and len(tasks) > 1:
            out = self.backbone(inputs, list(tasks))
            rows = out.tokens.shape[1] * b
            feats = {}
            for i, t in enumerate(tasks):
                routing = [type(r)(*(v[i * rows : (i + 1) * rows] for v in r)) for r in out.routing]
                feats[t] = M3ViTOutput(
                    out.tokens[i * b : (i + 1) * b], out.grid, out.balance_loss, routing
                )
            return feats, out.balance_loss
        feats = {t: self.backbone(inputs, t) for t in tasks}
        balance = sum((f.balance_loss for f in feats.values()), inputs.new_zeros(()))
        return feats, balance

    def encode_decode(self, inputs: Tensor, batch_img_metas: list[dict]) -> dict[str, Tensor]:
        """Logits of the inference tasks at the input size: ``{task: (B, C, H, W)}``."""
        return self._forward(inputs, None)

    # ------------------------------------------------------------------ training
    def loss(self, inputs: Tensor, data_samples: list[SegDataSample]) -> dict[str, Tensor]:
        """Losses of every task ``'<task>.loss_*'`` (weighted) and ``'loss_moe_balance'``."""
        feats, balance = self.extract_feat(inputs, self.tasks)
        losses: dict[str, Tensor] = {}
        stage_feats: dict[str, list[Tensor]] = {}
        for task in self.tasks:
            f = feats[task]
            logits, stage_feats[task] = self.heads[task].forward_with_features(
                f.tokens, f.grid, inputs.shape[-2:]
            )
            task_losses = self.heads[task].loss_by_feat(logits, data_samples)
            weight = self.loss_weights[task]
            losses.update(add_prefix({k: v * weight for k, v in task_losses.items()}, task))
        for level in self.tam_levels:
            aux = self.tam[f"level{level}"]({t: stage_feats[t][level] for t in self.tasks})
            for task, logits in aux.items():
                head = self.heads[task]
                logits = F.interpolate(
                    logits, inputs.shape[-2:], mode="bilinear", align_corners=head.align_corners
                )
                weight = self.loss_weights[task] * self.tam_loss_weight
                for k, v in head.loss_by_feat(logits, data_samples).items():
                    losses[f"{task}.tam{level}_{k}"] = v * weight
        losses["loss_moe_balance"] = balance * self.moe_balance_weight
        return losses

    def train_step(
        self, data: dict | tuple | list, optim_wrapper: OptimWrapper
    ) -> dict[str, Tensor]:
        """mmengine's step (preprocess, losses, backward, update), then the losses' label
        checks of a GPU batch, read once the whole step is queued (they do not stall it)."""
        log_vars = super().train_step(data, optim_wrapper)
        raise_label_errors(self)
        return log_vars

    # ------------------------------------------------------------------ inference
    def _tasks_for_inference(self, tasks: Sequence[str] | str | None) -> list[str]:
        if isinstance(tasks, str):
            tasks = [tasks]
        return check_tasks(tasks if tasks is not None else self.infer_tasks, self.tasks)

    def predict(
        self,
        inputs: Tensor,
        data_samples: list[SegDataSample] | None = None,
        tasks: Sequence[str] | str | None = None,
    ) -> list[SegDataSample]:
        """Predict ``tasks`` (default ``infer_tasks``); only their routers and heads run.

        Writes ``data_sample.<pred_field>`` (task table) as ``PixelData`` at ``ori_shape``
        (padding cropped with ``img_shape`` first): label ids long (1, H, W), depth float
        (1, H, W), normals unit vectors (3, H, W), edge / saliency probabilities (1, H, W).
        """
        tasks = self._tasks_for_inference(tasks)
        if data_samples is None:
            h, w = inputs.shape[-2:]
            data_samples = [
                SegDataSample(metainfo=dict(img_shape=(h, w), ori_shape=(h, w), pad_shape=(h, w)))
                for _ in range(inputs.shape[0])
            ]
        metas = [ds.metainfo for ds in data_samples]
        feats, _ = self.extract_feat(inputs, tasks)
        for task in tasks:
            head, f = self.heads[task], feats[task]
            preds = head.predict_by_feat(head(f.tokens, f.grid, inputs.shape[-2:]), metas)
            for ds, pred in zip(data_samples, preds):
                ds.set_data({head.spec.pred_field: PixelData(data=pred)})
        return data_samples

    def _forward(
        self,
        inputs: Tensor,
        data_samples: list[SegDataSample] | None = None,
        tasks: Sequence[str] | str | None = None,
    ) -> dict[str, Tensor]:
        """Raw logits ``{task: (B, C, H, W)}`` at the (padded) input size."""
        tasks = self._tasks_for_inference(tasks)
        feats, _ = self.extract_feat(inputs, tasks)
        return {t: self.heads[t](feats[t].tokens, feats[t].grid, inputs.shape[-2:]) for t in tasks}
