# The paper's NYUD-v2 2-task setting (semseg + depth; M3VIT.md s. 7: 45.6 mIoU /
# 0.589 RMSE, dm +1.59 with multi-gate routing).
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py"]

tasks = ["semseg", "depth"]
model = dict(
    decode_heads=dict(
        _delete_=True,
        semseg={{_base_.model.decode_heads.semseg}},
        depth={{_base_.model.decode_heads.depth}},
    ),
    loss_weights=dict(_delete_=True, semseg=1.0, depth=1.0),
)
train_dataloader = dict(dataset=dict(tasks=tasks))
val_dataloader = dict(dataset=dict(tasks=tasks))
test_dataloader = dict(dataset=dict(tasks=tasks))
val_evaluator = [
    dict(
        type="MultiTaskDeltaMetric",
        dataset="nyud",
        metrics=dict(
            semseg=dict(type="MultiTaskIoUMetric", task="semseg", num_classes=40),
            depth=dict(type="DepthErrorMetric"),
        ),
    )
]
test_evaluator = val_evaluator
