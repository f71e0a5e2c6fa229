# Training from scratch (no ImageNet weights): the M3ViT SGD recipe (momentum 0.9, weight
# decay 1e-4, poly 0.9 decay to 0) with lr 0.01 as the other from-scratch schedule
# (sgd_poly_600it.py) and a 100-iteration linear warm-up from 1 % of it; validation and
# checkpoints every quarter of the schedule (the best on the val split is kept).
_base_ = ["./sgd_poly_5k.py"]

max_iters = 1250
warmup_iters = 100
val_interval = max_iters // 4
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
