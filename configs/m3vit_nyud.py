# Entry point: M3ViT on NYUD-v2, 4 tasks, 480x640 (see configs/m3vit/ for the variants).
_base_ = ["./m3vit/m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud-480x640.py"]
