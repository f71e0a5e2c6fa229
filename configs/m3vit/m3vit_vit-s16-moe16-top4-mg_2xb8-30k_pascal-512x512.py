# M3ViT multi-gate, PASCAL-Context 5 tasks (semseg, parts, sal, normals, edge), 512x512,
# 2 GPUs x 8 images, 30k iterations (paper: 72.8 / 62.1 / 66.3 / 14.5 / 71.7, dm +2.71).
_base_ = [
    "../_base_/models/m3vit_vit-s16-moe16-top4.py",
    "../_base_/datasets/pascal_mt.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/sgd_poly_30k.py",
]

model = dict(
    dataset="pascal",
    data_preprocessor=dict(size=(512, 512), size_divisor=None),
    backbone=dict(img_size=(512, 512)),
)
