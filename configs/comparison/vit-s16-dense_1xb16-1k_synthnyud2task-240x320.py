# Comparison study: dense ViT-S/16 multi-task baseline (every block keeps its dense MLP,
# 384-1536-384: the active FLOPs of the top-4 MoE layer), one backbone pass shared by
# the two heads; everything else as the multi-gate config.
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_1xb16-1k_synthnyud2task-240x320.py"]

model = dict(backbone=dict(moe_layers=[], router="shared"))
