# Small M3ViT for the bundled synthetic NYUD-MT set (tools/demo.py): the model family and
# tasks of the 480x640 NYUD config, scaled down: D 96, 4 blocks, 3 attention heads, MoE
# on blocks 1 and 3 with 8 experts (hidden 96) top-2, 32-channel PUP heads, 96x128
# images, no pretrained weights, plain BN.
_base_ = [
    "../_base_/models/m3vit_vit-s16-moe16-top4.py",
    "../_base_/datasets/synthetic_nyud.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/sgd_poly_600it.py",
]

norm_cfg = dict(type="BN", requires_grad=True)
model = dict(
    backbone=dict(
        img_size=(96, 128),
        embed_dims=96,
        num_layers=4,
        num_heads=3,
        num_experts=8,
        top_k=2,
        expert_hidden_dims=96,
        pretrained=None,
    ),
    head_template=dict(channels=32, norm_cfg=norm_cfg),
)
