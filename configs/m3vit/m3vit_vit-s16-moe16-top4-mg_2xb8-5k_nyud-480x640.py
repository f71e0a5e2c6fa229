# M3ViT multi-gate, NYUD-v2 4 tasks (semseg, depth, normals, edge), 480x640,
# 2 GPUs x 8 images (global batch 16), 5k iterations.
_base_ = [
    "../_base_/models/m3vit_vit-s16-moe16-top4.py",
    "../_base_/datasets/nyud_mt.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/sgd_poly_5k.py",
]
