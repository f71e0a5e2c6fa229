# Throughput config: the 4-task NYUD M3ViT (multi-gate, 480x640, 8 images per GPU) on
# in-memory synthetic data, no validation or checkpoints. tools/gpu/ddp_scaling.py runs it
# with bf16 autocast (--cfg-options optim_wrapper.type=AmpOptimWrapper
# optim_wrapper.dtype=bfloat16):
#   PYTHONPATH=tools/gpu:$PYTHONPATH bash tools/dist_train.sh tools/gpu/ddp_synthetic_nyud.py N
_base_ = ["../../configs/m3vit/m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py"]
custom_imports = dict(imports=["mmseg_m3vit", "synthetic_data"], allow_failed_imports=False)

model = dict(backbone=dict(pretrained=None))
train_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(_delete_=True, type="SyntheticNYUDDataset", pool=16, size=(480, 640)),
)
max_iters = 80
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=10**9)
param_scheduler = [dict(type="PolyLR", power=0.9, begin=0, end=max_iters, by_epoch=False)]
val_dataloader = None
val_evaluator = None
val_cfg = None
test_dataloader = None
test_evaluator = None
test_cfg = None
default_hooks = dict(
    logger=dict(type="LoggerHook", interval=10, log_metric_by_epoch=False),
    checkpoint=dict(type="CheckpointHook", interval=10**9, save_best=None, save_last=False),
    visualization=dict(type="MultiTaskVisualizationHook", draw=False),
)
