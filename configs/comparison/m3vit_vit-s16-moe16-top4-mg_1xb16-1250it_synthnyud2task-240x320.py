# Comparison study (README "Results"), M3ViT multi-gate: the paper's NYUD 2-task setting
# (semseg + depth) and model (ViT-S/16, MoE with 16 experts top-4 on blocks 1, 3, ..., 11,
# SETR-PUP heads) on the synthetic NYUD-MT set at 240x320, trained from scratch on one
# GPU. Every config of this folder inherits this one and changes only the routing, the
# MoE layers or the task list: data, augmentation, schedule and seed policy are the same.
# Train: python tools/train.py CONFIG --amp [--cfg-options randomness.seed=1]
# All runs at once: python tools/analysis_tools/run_comparison.py (see its docstring).
_base_ = [
    "../_base_/models/m3vit_vit-s16-moe16-top4.py",
    "../_base_/datasets/synthetic_nyud_240x320.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/sgd_poly_warmup_1250it.py",
]

tasks = ["semseg", "depth"]
# random initialisation: nothing is downloaded, every model starts the same way
model = dict(tasks=tasks, backbone=dict(img_size=(240, 320), pretrained=None))
train_dataloader = dict(dataset=dict(tasks=tasks))
val_dataloader = dict(dataset=dict(tasks=tasks))
test_dataloader = dict(dataset=dict(tasks=tasks))
val_evaluator = dict(tasks=tasks)
test_evaluator = val_evaluator
