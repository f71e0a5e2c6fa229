# The paper's NYUD-v2 2-task setting (semseg + depth; M3VIT.md s. 7: 45.6 mIoU /
# 0.589 RMSE, dm +1.59 with multi-gate routing).
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py"]

tasks = ["semseg", "depth"]
model = dict(tasks=tasks)
train_dataloader = dict(dataset=dict(tasks=tasks))
val_dataloader = dict(dataset=dict(tasks=tasks))
test_dataloader = dict(dataset=dict(tasks=tasks))
val_evaluator = dict(tasks=tasks)
test_evaluator = val_evaluator
