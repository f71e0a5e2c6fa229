# Baseline: dense ViT-S/16 multi-task model on PASCAL-Context 5 tasks
# (paper: 70.7 / 58.7 / 64.9 / 15.5 / 68.8, dm -1.77).
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_2xb8-30k_pascal-512x512.py"]

model = dict(backbone=dict(moe_layers=[], router="shared"))
