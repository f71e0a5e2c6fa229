# M3ViT (M3VIT.md s. 1-3): ViT-S/16 (D 384, 12 blocks, 6 heads), MoE FFN on blocks
# 1, 3, ..., 11 with 16 experts (hidden 384) and top-4 multi-gate routing, one SETR-PUP
# head per task, NYUD-v2 4-task heads and loss weights (PASCAL configs replace them).
# Initialisation: DeiT-S ImageNet weights (timm layout) for the dense parts; experts are
# cut from the pretrained dense MLP (expert_init='split'; M3ViT's MoE checkpoint was
# never released). Download once:
#   mkdir -p checkpoints && wget -P checkpoints \
#     https://dl.fbaipublicfiles.com/deit/deit_small_patch16_224-cd65a155.pth
# or train from scratch with --cfg-options model.backbone.pretrained=None.
norm_cfg = dict(type="SyncBN", requires_grad=True)  # BN in single-process runs
data_preprocessor = dict(
    type="MultiTaskDataPreprocessor",
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    size_divisor=16,
    test_cfg=dict(size_divisor=16),
)
model = dict(
    type="MultiTaskSegmentor",
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type="M3ViT",
        img_size=(480, 640),
        patch_size=16,
        embed_dims=384,
        num_layers=12,
        num_heads=6,
        mlp_ratio=4.0,
        num_experts=16,
        top_k=4,
        expert_hidden_dims=384,
        router="multi_gate",
        noise_std=0.0,
        pretrained="checkpoints/deit_small_patch16_224-cd65a155.pth",
        expert_init="split",
    ),
    decode_heads=dict(
        semseg=dict(
            type="PUPHead",
            num_classes=40,
            channels=256,
            num_up=3,
            norm_cfg=norm_cfg,
            loss_decode=dict(type="PixelCrossEntropyLoss"),
        ),
        depth=dict(
            type="PUPHead",
            num_classes=1,
            channels=256,
            num_up=3,
            norm_cfg=norm_cfg,
            loss_decode=dict(type="DepthL1Loss"),
        ),
        normals=dict(
            type="PUPHead",
            num_classes=3,
            channels=256,
            num_up=3,
            norm_cfg=norm_cfg,
            loss_decode=dict(type="NormalsL1Loss"),
        ),
        edge=dict(
            type="PUPHead",
            num_classes=1,
            channels=256,
            num_up=3,
            norm_cfg=norm_cfg,
            loss_decode=dict(type="BalancedBCELoss", pos_weight=0.95),
        ),
    ),
    loss_weights=dict(semseg=1.0, depth=1.0, normals=10.0, edge=50.0),
    moe_balance_weight=0.01,
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
