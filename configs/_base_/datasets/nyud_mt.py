# NYUD-v2 in the NYUD_MT layout (M3VIT.md s. 5): 4 tasks at 480x640.
# Point data_root at the extracted NYUD_MT folder (images/, segmentation/, depth/,
# normals/, edge/, gt_sets/), or override on the command line:
#   --cfg-options train_dataloader.dataset.data_root=... (and val/test alike).
# Model selection (val_dataloader) uses a held-out 10% of the train list; the official
# val list (654 images) is the test split and is only used by tools/test.py.
dataset_type = "NYUDMTDataset"
data_root = "data/NYUD_MT"
# The tasks loaded and evaluated (the model predicts every NYUD task by default). A leaf
# config with other tasks sets its list in model.tasks, the dataloaders and the evaluator.
tasks = ["semseg", "depth", "normals", "edge"]
crop_size = (480, 640)  # (H, W)
holdout = dict(fraction=0.1, seed=0)

# Augmentation (M3VIT.md s. 3): scale in {1, 1.2, 1.5}, crop back to 480x640, h-flip
# that negates the x component of the normals.
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadMultiTaskAnnotations"),
    dict(
        type="RandomChoiceResize",
        scales=[(640, 480), (768, 576), (960, 720)],
        keep_ratio=True,
    ),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=1.0),
    dict(type="MultiTaskRandomFlip", prob=0.5, direction="horizontal"),
    dict(type="PackMultiTaskInputs"),
]
# Test at the native size: the ground truth stays untouched, the data preprocessor pads
# the image to a multiple of 16 and the segmentor crops the padding off its predictions.
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

# One metric per task inside the multi-task delta metric, which adds multitask/delta_m
# over the tasks with a published single-task reference (M3VIT.md s. 6: semseg 43.9 mIoU,
# depth 0.585 m RMSE, normals 19.76 deg; none for NYUD edges, so edge is reported only).
# A dict, so that leaf configs override single entries (task_metrics=dict(edge=...)).
val_evaluator = dict(
    type="MultiTaskDeltaMetric",
    dataset="nyud",
    tasks=tasks,
    task_metrics=dict(
        semseg=dict(type="MultiTaskIoUMetric"),
        depth=dict(type="DepthErrorMetric"),
        normals=dict(type="NormalsAngleMetric"),
        edge=dict(type="EdgeODSMetric", max_dist=0.0075),
    ),
)
test_evaluator = val_evaluator
