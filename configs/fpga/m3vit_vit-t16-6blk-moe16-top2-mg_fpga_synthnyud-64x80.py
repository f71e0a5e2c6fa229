# FPGA variant of M3ViT for the FINN flow (finn_flow/build.py, issue 6): ViT-T-like
# D 192, 3 heads, 16 experts (hidden 192) top-2, multi-gate, 64x80 input (4x5 patches),
# PUP heads with nearest-neighbour upsampling (32 channels, from the synthetic config).
# Depth: 6 blocks, MoE on every other block (1, 3, 5), half of ViT-T's 12, so that
# `python finn_flow/build.py --task normals` finishes on 2 CPU cores within 10 minutes.
# The build cuts the graph at its residual stream and runs FINN's steps piece by piece
# (finn_flow/pieces.py), so its time grows about linearly with the depth: the 12-block
# pathway (model.backbone.num_layers=12, moe_layers=[1, 3, 5, 7, 9, 11]) was measured at
# 819 s on 2 cores (see the issue notes / README).
# Trainable like any other config (data part from the synthetic NYUD config).
_base_ = ["../m3vit_synthetic.py"]  # stable entry point of the synthetic NYUD config

custom_imports = dict(imports=["mmseg_m3vit"], allow_failed_imports=False)
default_scope = "mmseg"

crop_size = (64, 80)
model = dict(
    backbone=dict(
        img_size=crop_size,
        embed_dims=192,
        num_layers=6,
        num_heads=3,
        moe_layers=[1, 3, 5],
        num_experts=16,
        top_k=2,
        expert_hidden_dims=192,
        pretrained=None,
    ),
    # The PUP heads run on the FPGA too: nearest-neighbour x2 steps (FINN's
    # UpsampleNearestNeighbour layer; bilinear has none). 4x5 patches x 16 = 64x80, so no
    # final resize is needed. Still trainable (PUPHead upsample_mode, default bilinear).
    decode_heads=dict(
        semseg=dict(upsample_mode="nearest"),
        depth=dict(upsample_mode="nearest"),
        normals=dict(upsample_mode="nearest"),
        edge=dict(upsample_mode="nearest"),
    ),
)

# What finn_flow/build.py reads (the rest of the file is an ordinary mmseg config).
fpga = dict(
    input_size=crop_size,  # (H, W) of the frame the FPGA pathway is built for
    bits=8,  # weights and activations (softmax / gates: 8-bit fixed scale 1/255)
    clock_ns=5.0,  # 200 MHz
    target_fps=30,  # auto-folding target when no folding JSON is used
    use_folding_json=False,  # True: finn_flow/folding/<task>.json instead of target_fps
    calib_images=8,
)
