"""tools/analysis_tools/flops.py against closed-form multiply-add counts."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from mmseg_m3vit.models.moe import MoEFFN

ROOT = Path(__file__).resolve().parents[1]


def _flops_tool():
    spec = importlib.util.spec_from_file_location(
        "m3vit_flops_tool", ROOT / "tools" / "analysis_tools" / "flops.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


D, HEADS, E, K, HD, CH = 32, 2, 4, 2, 16, 8
CLASSES = {"semseg": 40, "depth": 1, "normals": 3, "edge": 1}

CONFIG = f"""
default_scope = 'mmseg'
_losses = dict(
    semseg=dict(type='PixelCrossEntropyLoss'), depth=dict(type='DepthL1Loss'),
    normals=dict(type='NormalsL1Loss'), edge=dict(type='BalancedBCELoss', pos_weight=0.95))
model = dict(
    type='MultiTaskSegmentor',
    backbone=dict(type='M3ViT', img_size=(32, 48), embed_dims={D}, num_heads={HEADS},
                  num_layers=4, num_experts={E}, top_k={K}, expert_hidden_dims={HD}),
    decode_heads={{t: dict(type='PUPHead', num_classes=c, channels={CH}, loss_decode=_losses[t])
                  for t, c in {CLASSES}.items()}})
"""


@pytest.mark.parametrize("router", ["multi_gate", "shared"])
def test_moe_layer_macs_closed_form(router: str) -> None:
    tool = _flops_tool()
    b, n = 2, 7
    moe = MoEFFN(D, HD, num_experts=E, top_k=K, router=router, num_tasks=2).eval()
    with tool.flop_counter() as counter, torch.no_grad():
        moe(torch.randn(b, n, D), torch.tensor([0, 1]))
    tokens = b * n
    # k experts of two D x Hd matmuls per token + the D x E router; biases not counted
    assert counter.get_total_flops() // 2 == K * 2 * tokens * D * HD + tokens * D * E


def _closed_form_backbone(n_tok: int, passes_dense0: int, passes_rest: int) -> dict[str, int]:
    attn = n_tok * D * 3 * D + n_tok * D * D + 2 * n_tok * n_tok * D
    return {
        "patch_embed": 6 * 3 * 16 * 16 * D,
        "attention": attn * (passes_dense0 + 3 * passes_rest),
        "dense_mlp": 2 * n_tok * D * 4 * D * (passes_dense0 + passes_rest),
        "moe_experts": 2 * K * 2 * n_tok * D * HD * passes_rest,
        "routers": 2 * n_tok * D * E * passes_rest,
    }


def _head_macs(num_classes: int) -> int:
    # PUP at grid 2x3: conv3x3 D->CH at 2x3, CH->CH at 4x6, 8x12, 16x24, conv1x1 at 16x24
    convs = 9 * D * CH * 6 + 9 * CH * CH * (24 + 96 + 384)
    return convs + CH * num_classes * 384


def test_flops_tool_table_and_json(tmp_path, capsys) -> None:
    tool = _flops_tool()
    cfg = tmp_path / "tiny_nyud.py"
    cfg.write_text(CONFIG)
    out_json = tmp_path / "flops.json"
    tool.main([str(cfg), "--shape", "32", "48", "--json", str(out_json)])
    table = capsys.readouterr().out
    assert "moe_experts" in table and "semseg" in table and "all" in table
    rows = json.loads(out_json.read_text())["rows"]
    n_tok = 1 + 2 * 3
    for task, c in CLASSES.items():
        expected = _closed_form_backbone(n_tok, 1, 1)
        expected["heads"] = _head_macs(c)
        expected["total"] = sum(expected.values())
        assert rows[task] == expected, task
    # all four tasks, task-batched: block 0 and block 1's attention once (everything
    # before the first router), block 1's MoE FFN and blocks 2..3 on 4 copies
    expected = _closed_form_backbone(n_tok, 1, 4)
    attn = n_tok * D * 3 * D + n_tok * D * D + 2 * n_tok * n_tok * D
    expected["attention"] = attn * (1 + 1 + 2 * 4)
    expected["dense_mlp"] = 2 * n_tok * D * 4 * D * (1 + 4)
    expected["heads"] = sum(_head_macs(c) for c in CLASSES.values())
    expected["total"] = sum(expected.values())
    assert rows["all"] == expected


def test_flops_tool_rejects_unknown_task(tmp_path) -> None:
    tool = _flops_tool()
    cfg = tmp_path / "tiny.py"
    cfg.write_text(CONFIG)
    with pytest.raises(SystemExit, match="unknown task 'sal'"):
        tool.main([str(cfg), "--task", "sal", "--shape", "32", "48"])
