# Baseline: dense ViT-S/16 multi-task model (no MoE layers: every block keeps its dense
# MLP), one backbone pass shared by the heads (paper: 40.9 mIoU / 0.631 RMSE).
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud2task-480x640.py"]

model = dict(backbone=dict(moe_layers=[], router="shared"))
