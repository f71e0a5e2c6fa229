# Comparison study: M3ViT with one router shared by both tasks (one backbone pass, both
# heads read the same features); everything else as the multi-gate config.
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_1xb16-1250it_synthnyud2task-240x320.py"]

model = dict(backbone=dict(router="shared"))
