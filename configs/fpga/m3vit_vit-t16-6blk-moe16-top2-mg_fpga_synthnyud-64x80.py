# M3ViT for the FINN flow (finn_flow/build.py): ViT-T/16 widths (D 192, 3 heads) cut to 6
# blocks with MoE on blocks 1, 3, 5 (16 experts of hidden 192, top-2, multi-gate), for a
# 64x80 input frame (4x5 patches); PUP heads with nearest-neighbour upsampling.
# Six blocks keep `python finn_flow/build.py --task normals` short on a laptop-class
# machine; the 12-block pathway is ./m3vit_vit-t16-moe16-top2-mg_fpga_synthnyud-64x80.py.
# Trainable like any other config, on the synthetic NYUD set (96x128 crops: the position
# embeddings are stored for 64x80 and resized on the fly).
_base_ = [
    "../_base_/models/m3vit_vit-s16-moe16-top4.py",
    "../_base_/datasets/synthetic_nyud.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/sgd_poly_600it.py",
]

input_size = (64, 80)  # (H, W) of the frame the FPGA pathway is built for
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

# What finn_flow/build.py reads (the rest of the file is an ordinary mmseg config).
fpga = dict(
    input_size=input_size,
    bits=8,  # weights and activations (softmax / gates: 8-bit fixed scale 1/255)
    clock_ns=5.0,  # 200 MHz
    target_fps=30,  # auto-folding target when no folding JSON is used
    use_folding_json=False,  # True: finn_flow/folding/<task>.json instead of target_fps
    calib_images=8,
)
