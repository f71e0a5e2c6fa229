# Router ablation: one router shared by all tasks; the backbone runs once per image and
# both heads read the same features (paper: 45.3 / 0.600, dm +0.31).
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud2task-480x640.py"]

model = dict(backbone=dict(router="shared"))
