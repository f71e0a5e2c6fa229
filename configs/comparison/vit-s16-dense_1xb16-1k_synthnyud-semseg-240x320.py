# Comparison study: dense ViT-S/16 single-task model for semseg, the Δm reference;
# everything else as the dense multi-task config.
_base_ = ["./vit-s16-dense_1xb16-1k_synthnyud2task-240x320.py"]

tasks = ["semseg"]
model = dict(
    decode_heads=dict(_delete_=True, semseg={{_base_.model.decode_heads.semseg}}),
    loss_weights=dict(_delete_=True, semseg=1.0),
)
train_dataloader = dict(dataset=dict(tasks=tasks))
val_dataloader = dict(dataset=dict(tasks=tasks))
test_dataloader = dict(dataset=dict(tasks=tasks))
val_evaluator = [
    dict(
        type="MultiTaskDeltaMetric",
        dataset="nyud",
        metrics=dict(semseg=dict(type="MultiTaskIoUMetric", task="semseg", num_classes=40)),
    )
]
test_evaluator = val_evaluator
