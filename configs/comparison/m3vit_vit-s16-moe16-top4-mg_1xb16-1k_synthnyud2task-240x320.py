# Comparison study on the synthetic NYUD-format set (README "Results"): M3ViT multi-gate,
# the paper's 2-task NYUD setting (semseg + depth) and model (ViT-S/16, MoE 16 experts
# top-4 on blocks 1, 3, ..., 11, SETR-PUP heads), trained from scratch at 240x320.
# Every model of the study (configs/comparison/) inherits this file and changes only the
# backbone's routing / MoE layers or the task list, so data, augmentation, schedule and
# seed policy are the same for all of them.
# Data: python tools/dataset_converters/make_synthetic_nyud.py \
#           --out data/synthetic_nyud_240x320 --num-train 2400 --num-val 400 --size 240 320 --seed 0
# (a held-out 10 % of the 2400 train ids selects the checkpoint; the 400 val ids are the
# test split). Train: python tools/train.py THIS_CONFIG --amp [--cfg-options randomness.seed=1]
_base_ = ["../m3vit/m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud2task-480x640.py"]

data_root = "data/synthetic_nyud_240x320"
crop_size = (240, 320)  # (H, W)
max_iters = 1000
warmup_iters = 100
val_interval = max_iters // 4

# No ImageNet weights (nothing is downloaded): every model starts from random weights.
model = dict(backbone=dict(img_size=crop_size, pretrained=None))

# The NYUD augmentation at half the size: scale in {1, 1.2, 1.5}, crop back, h-flip.
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadMultiTaskAnnotations"),
    dict(
        type="RandomChoiceResize",
        scales=[(320, 240), (384, 288), (480, 360)],
        keep_ratio=True,
    ),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=1.0),
    dict(type="MultiTaskRandomFlip", prob=0.5, direction="horizontal"),
    dict(type="PackMultiTaskInputs"),
]
train_dataloader = dict(
    batch_size=16,  # the paper's global batch, on one GPU
    num_workers=2,
    dataset=dict(data_root=data_root, pipeline=train_pipeline),
)
val_dataloader = dict(batch_size=8, num_workers=2, dataset=dict(data_root=data_root))
test_dataloader = dict(batch_size=8, num_workers=2, dataset=dict(data_root=data_root))

# From scratch: SGD momentum 0.9 / weight decay 1e-4 as the paper, lr 0.01 (the repo's
# from-scratch setting, configs/m3vit_synthetic.py), a short linear warm-up, then poly 0.9.
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [
    dict(type="LinearLR", start_factor=0.01, begin=0, end=warmup_iters, by_epoch=False),
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=warmup_iters, end=max_iters, by_epoch=False),
]
train_cfg = dict(max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=val_interval, max_keep_ckpts=1),
)
