# M3ViT (M3VIT.md s. 1-3): ViT-S/16 (D 384, 12 blocks, 6 heads), MoE FFN on blocks
# 1, 3, ..., 11 with 16 experts (hidden 384) and top-4 multi-gate routing, one SETR-PUP
# head per task with the paper's losses and loss weights.
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
    # NYUD-v2 by default (its tasks, and each head's classes from the task table);
    # PASCAL configs set dataset="pascal" and img_size 512x512.
    dataset="nyud",
    # One SETR-PUP head per task: the template, then each task's loss. The table covers
    # every task of the task table; the segmentor builds those of the data set (or of
    # `tasks`).
    head_template=dict(type="PUPHead", channels=256, num_up=3, norm_cfg=norm_cfg),
    decode_heads=dict(
        semseg=dict(loss_decode=dict(type="PixelCrossEntropyLoss")),
        parts=dict(loss_decode=dict(type="PixelCrossEntropyLoss")),
        sal=dict(loss_decode=dict(type="BalancedBCELoss", pos_weight=None)),
        depth=dict(loss_decode=dict(type="DepthL1Loss")),
        normals=dict(loss_decode=dict(type="NormalsL1Loss")),
        edge=dict(loss_decode=dict(type="BalancedBCELoss", pos_weight=0.95)),
    ),
    # M3VIT.md s. 3: the paper's weights, the same for a task on NYUD and PASCAL.
    loss_weights=dict(semseg=1.0, parts=2.0, sal=5.0, depth=1.0, normals=10.0, edge=50.0),
    moe_balance_weight=0.01,
    train_cfg=dict(),
    test_cfg=dict(mode="whole"),
)
