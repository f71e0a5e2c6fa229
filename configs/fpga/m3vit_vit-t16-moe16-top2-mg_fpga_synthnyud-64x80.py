# The full-depth ViT-T pathway for the FINN flow: the default FPGA config with all 12
# blocks (MoE on every other block). `python finn_flow/build.py --task normals --config
# configs/fpga/m3vit_vit-t-moe16-top2-mg-12blk_fpga_nyud-64x80.py` measured 819 s on
# 2 CPU cores (piece-wise FINN steps, finn_flow/pieces.py); use --jobs N on more cores.
_base_ = ["./m3vit_vit-t-moe16-top2-mg_fpga_nyud-64x80.py"]

model = dict(backbone=dict(num_layers=12, moe_layers=[1, 3, 5, 7, 9, 11]))
