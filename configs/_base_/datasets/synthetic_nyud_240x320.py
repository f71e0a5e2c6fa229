# The synthetic NYUD-MT set at 240x320 used by the comparison study (configs/comparison/):
# tools/dataset_converters/make_synthetic_nyud.py --out data/synthetic_nyud_240x320 \
#     --num-train 2400 --num-val 400 --size 240 320 --seed 0
# NYUD's layout, tasks, metrics and augmentation (scale in {1, 1.2, 1.5}, crop back,
# h-flip) at half NYUD's size; batch 16 on one GPU (the paper's global batch). Model
# selection uses the held-out 10 % of the 2400 train ids; the 400 val ids are the test
# split.
_base_ = ["./nyud_mt.py"]

data_root = "data/synthetic_nyud_240x320"
crop_size = (240, 320)

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
    batch_size=16,
    num_workers=2,
    dataset=dict(data_root=data_root, pipeline=train_pipeline),
)
val_dataloader = dict(batch_size=8, num_workers=2, dataset=dict(data_root=data_root))
test_dataloader = dict(batch_size=8, num_workers=2, dataset=dict(data_root=data_root))

# Edge ODS with 19 thresholds (as the 96x128 synthetic set); the study's tasks have none.
val_evaluator = dict(task_metrics=dict(edge=dict(num_thresholds=19)))
test_evaluator = val_evaluator
