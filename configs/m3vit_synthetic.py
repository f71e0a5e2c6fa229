# Entry point: the small M3ViT config for the bundled synthetic NYUD-MT set (tools/demo.py).
_base_ = ["./m3vit/m3vit_vit-d96-4blk-moe8-top2-mg_1xb8-600it_synthnyud-96x128.py"]
