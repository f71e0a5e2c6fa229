# M3ViT schedule (docs/model.md s. 3): SGD momentum 0.9, weight decay 1e-4, lr 2e-3, poly 0.9
# decay to 0, no warm-up, 5k iterations (100 epochs of NYUD's 795 images at batch 16).
# Model selection: save_best on the multi-task delta (higher is better) measured on the
# validation split of the data-set config (a held-out part of train, never the test split).
_base_ = ["mmseg::_base_/schedules/schedule_20k.py"]

max_iters = 5000
val_interval = 500
optim_wrapper = dict(
    type="OptimWrapper",
    optimizer=dict(type="SGD", lr=2e-3, momentum=0.9, weight_decay=1e-4),
    clip_grad=None,
)
param_scheduler = [
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=50, log_metric_by_epoch=False),
    checkpoint=dict(
        type="CheckpointHook",
        by_epoch=False,
        interval=val_interval,
        max_keep_ckpts=2,
        save_best="multitask/delta_m",
        rule="greater",
    ),
    visualization=dict(type="MultiTaskVisualizationHook", draw=False),
)
