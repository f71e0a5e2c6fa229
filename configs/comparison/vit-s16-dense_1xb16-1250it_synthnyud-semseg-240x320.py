# Comparison study: dense ViT-S/16 trained on semseg alone, the single-task reference of
# Δm; everything else as the dense multi-task config.
_base_ = ["./vit-s16-dense_1xb16-1250it_synthnyud2task-240x320.py"]

tasks = ["semseg"]
model = dict(tasks=tasks)
train_dataloader = dict(dataset=dict(tasks=tasks))
val_dataloader = dict(dataset=dict(tasks=tasks))
test_dataloader = dict(dataset=dict(tasks=tasks))
val_evaluator = dict(tasks=tasks)
test_evaluator = val_evaluator
