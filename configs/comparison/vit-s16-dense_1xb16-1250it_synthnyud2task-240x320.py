# Comparison study: dense ViT-S/16 multi-task baseline. Every block keeps its dense MLP
# (384-1536-384, the active multiply-adds of a top-4 MoE layer with 16 experts of hidden
# 384), one backbone pass shared by both heads; everything else as the multi-gate config.
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_1xb16-1250it_synthnyud2task-240x320.py"]

model = dict(backbone=dict(moe_layers=[], router="shared"))
