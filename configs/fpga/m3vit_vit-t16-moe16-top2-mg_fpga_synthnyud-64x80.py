# The full-depth ViT-T/16 pathway for the FINN flow: the 6-block FPGA config with all 12
# blocks (MoE on blocks 1, 3, ..., 11). Build it with
# `python finn_flow/build.py --task normals --config <this file>` (use --jobs N on a
# machine with more cores).
_base_ = ["./m3vit_vit-t16-6blk-moe16-top2-mg_fpga_synthnyud-64x80.py"]

model = dict(backbone=dict(num_layers=12))
