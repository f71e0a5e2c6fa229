# PASCAL-Context in the PASCAL_MT layout (M3VIT.md s. 5): 5 tasks, 512x512 crops.
# Point data_root at the extracted PASCAL_MT folder or use --cfg-options
# train_dataloader.dataset.data_root=... (and val/test alike).
# Model selection on a held-out 10% of train; the official val list is the test split.
# Augmentation (M3VIT.md s. 3): h-flip, rotation +-20 deg, scale 0.75-1.25, 512x512
# crops; flip and rotation also turn the normal vectors, padding uses each task's value.
dataset_type = "PascalMTDataset"
data_root = "data/PASCAL_MT"
# The tasks loaded and evaluated (the model predicts every PASCAL task with
# model.dataset="pascal"). A leaf config with other tasks sets its list in model.tasks,
# the dataloaders and the evaluator.
tasks = ["semseg", "parts", "sal", "normals", "edge"]
crop_size = (512, 512)
holdout = dict(fraction=0.1, seed=0)

train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadMultiTaskAnnotations"),
    dict(type="RandomResize", scale=(512, 512), ratio_range=(0.75, 1.25), keep_ratio=True),
    dict(type="MultiTaskRandomRotate", prob=1.0, degree=20),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=1.0),
    dict(type="MultiTaskRandomFlip", prob=0.5, direction="horizontal"),
    dict(type="PackMultiTaskInputs"),
]
test_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadMultiTaskAnnotations"),
    dict(type="PackMultiTaskInputs"),
]

train_dataloader = dict(
    batch_size=8,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type="InfiniteSampler", shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split="train",
        tasks=tasks,
        holdout=dict(holdout, part="train"),
        pipeline=train_pipeline,
    ),
)
val_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split="train",
        tasks=tasks,
        holdout=dict(holdout, part="holdout"),
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
test_dataloader = dict(
    batch_size=1,
    num_workers=2,
    persistent_workers=True,
    sampler=dict(type="DefaultSampler", shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        split="val",
        tasks=tasks,
        test_mode=True,
        pipeline=test_pipeline,
    ),
)
# Per-task metrics and multitask/delta_m against the paper's single-task references
# (M3VIT.md s. 6: semseg 66.2, parts 59.9, sal 66.3, normals 13.9, edge 68.8).
val_evaluator = dict(
    type="MultiTaskDeltaMetric",
    dataset="pascal",
    tasks=tasks,
    task_metrics=dict(
        semseg=dict(type="MultiTaskIoUMetric"),
        parts=dict(type="MultiTaskIoUMetric"),
        sal=dict(type="SaliencyMetric"),
        normals=dict(type="NormalsAngleMetric"),
        edge=dict(type="EdgeODSMetric", max_dist=0.0075),
    ),
)
test_evaluator = val_evaluator
