# A short schedule for small models trained from scratch on the synthetic set: the M3ViT
# SGD + poly recipe with lr 0.01 over 600 iterations, validating every 200.
_base_ = ["./sgd_poly_5k.py"]

max_iters = 600
val_interval = 200
optim_wrapper = dict(optimizer=dict(lr=0.01))
param_scheduler = [
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(
    logger=dict(interval=25),
    checkpoint=dict(interval=val_interval, max_keep_ckpts=1),
)
