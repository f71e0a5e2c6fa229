# The M3ViT schedule over 30k iterations: ~100 epochs of PASCAL-Context's 4998 train
# images (minus the 10% held out for model selection) at global batch 16.
_base_ = ["./sgd_poly_5k.py"]

max_iters = 30000
val_interval = 3000
param_scheduler = [
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(checkpoint=dict(interval=val_interval))
