# Entry point: M3ViT on PASCAL-Context, 5 tasks, 512x512 (see configs/m3vit/).
_base_ = ["./m3vit/m3vit_vit-s16-moe16-top4-mg_2xb8-30k_pascal-512x512.py"]
