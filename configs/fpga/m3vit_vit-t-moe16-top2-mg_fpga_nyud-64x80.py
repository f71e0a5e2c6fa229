# FPGA variant of M3ViT for the FINN flow (finn_flow/build.py, issue 6): ViT-T-like
# D 192, 3 heads, 16 experts (hidden 192) top-2, multi-gate, 64x80 input (4x5 patches),
# PUP heads with nearest-neighbour upsampling (32 channels, from the synthetic config).
# Depth: 2 blocks (block 0 dense, block 1 MoE) so that `python finn_flow/build.py
# --task normals` finishes on 2 CPU cores within 10 minutes: finn-plus's streamlining
# time grows quickly with the node count (each block adds ~60 nodes per head); a
# 12-block build is the same pathway repeated and is left to a larger machine.
# Trainable like any other config (data part from the synthetic NYUD config).
_base_ = ["../m3vit_synthetic.py"]  # stable entry point of the synthetic NYUD config

custom_imports = dict(imports=["mmseg_m3vit"], allow_failed_imports=False)
default_scope = "mmseg"

crop_size = (64, 80)
model = dict(
    backbone=dict(
        img_size=crop_size,
        embed_dims=192,
        num_layers=2,
        num_heads=3,
        moe_layers=[1],
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
