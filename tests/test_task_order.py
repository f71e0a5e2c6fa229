"""Task routers load by task name: a config listing the heads in another order gets each
task its own router; other tasks, or task-indexed weights without names, fail."""

from __future__ import annotations

import pytest
import torch
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import load_checkpoint as mmengine_load_checkpoint
from mmseg.registry import MODELS

import mmseg_m3vit  # noqa: F401
from mmseg_m3vit.compat import load_model_checkpoint
from mmseg_m3vit.models.task_order import TaskOrderError, decode_task_names

LOSSES = dict(semseg="PixelCrossEntropyLoss", depth="DepthL1Loss", normals="NormalsL1Loss")
CLASSES = dict(semseg=5, depth=1, normals=3)


def segmentor(tasks: list[str], router: str = "multi_gate", tam: dict | None = None):
    init_default_scope("mmseg")
    heads = {
        t: dict(type="PUPHead", num_classes=CLASSES[t], channels=8, num_up=1,
                loss_decode=dict(type=LOSSES[t]))
        for t in tasks
    }  # fmt: skip
    backbone = dict(
        type="M3ViT", img_size=(32, 32), embed_dims=16, num_layers=2, num_heads=2,
        num_experts=4, top_k=2, expert_hidden_dims=8, router=router,
    )  # fmt: skip
    return MODELS.build(
        dict(type="MultiTaskSegmentor", backbone=backbone, decode_heads=heads, tam=tam)
    ).eval()


def trained_like(tasks: list[str], router: str, seed: int = 0):
    """A segmentor whose routers differ strongly between tasks (as after training)."""
    torch.manual_seed(seed)
    model = segmentor(tasks, router)
    with torch.no_grad():
        for p in model.backbone.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("router", ["multi_gate", "task_conditioned"])
def test_reordered_heads_get_their_own_routers(tmp_path, router: str) -> None:
    trained = trained_like(["semseg", "depth", "normals"], router)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": trained.state_dict(), "meta": {}}, path)
    assert decode_task_names(torch.load(path)["state_dict"]["backbone._extra_state"]) == [
        "semseg",
        "depth",
        "normals",
    ]
    x = torch.randn(2, 3, 32, 32)
    reference = {t: trained.backbone(x, t) for t in ("semseg", "depth", "normals")}
    # the routing really depends on the task (else the test could not see a mix-up)
    assert not torch.equal(reference["semseg"].tokens, reference["normals"].tokens)

    for loader in ("ours", "mmengine"):
        reordered = segmentor(["normals", "semseg", "depth"], router)
        if loader == "ours":
            load_model_checkpoint(reordered, str(path))
        else:  # the Runner's path (load_from / resume)
            mmengine_load_checkpoint(reordered, str(path), map_location="cpu", strict=True)
        for task, ref in reference.items():
            out = reordered.backbone(x, task)
            torch.testing.assert_close(out.tokens, ref.tokens, rtol=0, atol=0, msg=task)
            for a, b in zip(out.routing, ref.routing):
                assert torch.equal(a.expert_ids, b.expert_ids), task
        # saved again, the names follow the new order
        names = decode_task_names(reordered.state_dict()["backbone._extra_state"])
        assert names == ["normals", "semseg", "depth"]


def test_other_tasks_or_missing_names_fail(tmp_path) -> None:
    trained = trained_like(["semseg", "depth"], "multi_gate")
    sd = trained.state_dict()
    torch.save({"state_dict": sd}, tmp_path / "two.pth")
    with pytest.raises(TaskOrderError, match=r"trained for tasks \['semseg', 'depth'\].*"
                       r"model has tasks \['semseg', 'normals'\]"):  # fmt: skip
        load_model_checkpoint(segmentor(["semseg", "normals"]), str(tmp_path / "two.pth"))
    # written without names (older code): the rows cannot be assigned, so it fails
    del sd["backbone._extra_state"]
    torch.save({"state_dict": sd}, tmp_path / "unnamed.pth")
    for load in (
        lambda m: load_model_checkpoint(m, str(tmp_path / "unnamed.pth")),
        lambda m: mmengine_load_checkpoint(m, str(tmp_path / "unnamed.pth"), map_location="cpu"),
    ):
        with pytest.raises(TaskOrderError, match="no task names"):
            load(segmentor(["depth", "semseg"]))
    # one task: nothing to map, so a file without names loads
    single = trained_like(["depth"], "multi_gate")
    sd1 = single.state_dict()
    del sd1["backbone._extra_state"]
    torch.save({"state_dict": sd1}, tmp_path / "single.pth")
    load_model_checkpoint(segmentor(["depth"]), str(tmp_path / "single.pth"))
    # a shared router has no task-indexed rows: any order loads
    shared = trained_like(["semseg", "depth"], "shared")
    torch.save({"state_dict": shared.state_dict()}, tmp_path / "shared.pth")
    load_model_checkpoint(segmentor(["depth", "semseg"], "shared"), str(tmp_path / "shared.pth"))


def test_task_attention_module_order_is_checked(tmp_path) -> None:
    tam = dict(levels=(0,), loss_weight=1.0)
    torch.manual_seed(0)
    model = segmentor(["semseg", "depth"], tam=tam)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "tam.pth")
    load_model_checkpoint(segmentor(["semseg", "depth"], tam=tam), str(tmp_path / "tam.pth"))
    with pytest.raises(TaskOrderError, match="TaskAttentionModule depends on the order"):
        load_model_checkpoint(segmentor(["depth", "semseg"], tam=tam), str(tmp_path / "tam.pth"))
