# M3ViT for the FINN flow (finn_flow/build.py): ViT-T/16 widths (D 192, 3 heads) cut to 6
# blocks with MoE on blocks 1, 3, 5 (16 experts of hidden 192, top-2, multi-gate), for a
# 64x80 input frame (4x5 patches); PUP heads with nearest-neighbour upsampling.
# Six blocks keep `python finn_flow/build.py --task normals` short on a laptop-class
# machine; the 12-block pathway is ./m3vit_vit-t16-moe16-top2-mg_fpga_synthnyud-64x80.py.
# Training (docs/fpga.md, "Trained FPGA model"): the synthetic NYUD set rendered at the
# FPGA's own frame size, so that training, validation and the FPGA see the same frames:
#   python tools/dataset_converters/make_synthetic_nyud.py --out data/synthetic_nyud_64x80 \
#       --num-train 320 --num-val 80 --size 64 80
#   OMP_NUM_THREADS=1 python tools/train.py <this file> --work-dir work_dirs/fpga_normals
_base_ = [
    "../_base_/models/m3vit_vit-s16-moe16-top4.py",
    "../_base_/datasets/synthetic_nyud.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/sgd_poly_600it.py",
]

input_size = (64, 80)  # (H, W) of the frame the FPGA pathway is built for
data_root = "data/synthetic_nyud_64x80"
crop_size = input_size
norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    backbone=dict(
        img_size=input_size,
        embed_dims=192,
        num_layers=6,
        num_heads=3,
        top_k=2,
        expert_hidden_dims=192,
        pretrained=None,
    ),
    # The PUP heads run on the FPGA too: nearest-neighbour x2 steps (FINN's
    # UpsampleNearestNeighbour layer; bilinear has none). 4x5 patches x 16 = 64x80, so no
    # final resize is needed.
    head_template=dict(channels=32, norm_cfg=norm_cfg, upsample_mode="nearest"),
)

# The synthetic set's augmentation at this size: scale in {1, 1.2, 1.5}, crop, h-flip;
# validation on the val split's 64x80 frames as they are (what the FPGA sees).
train_pipeline = [
    dict(type="LoadImageFromFile"),
    dict(type="LoadMultiTaskAnnotations"),
    dict(type="RandomChoiceResize", scales=[(80, 64), (96, 77), (120, 96)], keep_ratio=True),
    dict(type="RandomCrop", crop_size=crop_size, cat_max_ratio=1.0),
    dict(type="MultiTaskRandomFlip", prob=0.5, direction="horizontal"),
    dict(type="PackMultiTaskInputs"),
]
train_dataloader = dict(dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(data_root=data_root))
test_dataloader = val_dataloader

# 2000 iterations of batch 8 (the 600-iteration schedule's lr 0.01 and poly decay):
# about 0.36 CPU-seconds per iteration on one core (docs/fpga.md has the measurements).
max_iters = 2000
val_interval = 1000
param_scheduler = [
    dict(type="PolyLR", eta_min=0.0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=val_interval)
default_hooks = dict(
    logger=dict(interval=100), checkpoint=dict(interval=val_interval, max_keep_ckpts=1)
)

# What finn_flow/build.py reads (the rest of the file is an ordinary mmseg config).
fpga = dict(
    input_size=input_size,
    bits=8,  # weights and activations (softmax / gates: 8-bit fixed scale 1/255)
    clock_ns=5.0,  # 200 MHz
    target_fps=30,  # auto-folding target when no folding JSON is used
    use_folding_json=True,  # finn_flow/folding/<task>.json where it fits, else target_fps
    calib_images=8,
)
