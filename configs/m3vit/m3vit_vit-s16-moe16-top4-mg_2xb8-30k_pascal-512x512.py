# M3ViT multi-gate, PASCAL-Context 5 tasks (semseg, parts, sal, normals, edge), 512x512,
# 2 GPUs x 8 images, 30k iterations (paper: 72.8 / 62.1 / 66.3 / 14.5 / 71.7, dm +2.71).
_base_ = [
    "../_base_/models/m3vit_vit-s16-moe16-top4.py",
    "../_base_/datasets/pascal_mt.py",
    "../_base_/default_runtime.py",
    "../_base_/schedules/sgd_poly_30k.py",
]

norm_cfg = dict(type="SyncBN", requires_grad=True)
model = dict(
    data_preprocessor=dict(size=(512, 512), size_divisor=None),
    backbone=dict(img_size=(512, 512)),
    decode_heads=dict(
        _delete_=True,
        semseg=dict(
            type="PUPHead",
            num_classes=21,
            channels=256,
            num_up=3,
            norm_cfg=norm_cfg,
            loss_decode=dict(type="PixelCrossEntropyLoss"),
        ),
        parts=dict(
            type="PUPHead",
            num_classes=7,
            channels=256,
            num_up=3,
            norm_cfg=norm_cfg,
            loss_decode=dict(type="PixelCrossEntropyLoss"),
        ),
        sal=dict(
            type="PUPHead",
            num_classes=1,
            channels=256,
            num_up=3,
            norm_cfg=norm_cfg,
            loss_decode=dict(type="BalancedBCELoss", pos_weight=None),
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
    loss_weights=dict(_delete_=True, semseg=1.0, parts=2.0, sal=5.0, normals=10.0, edge=50.0),
)
