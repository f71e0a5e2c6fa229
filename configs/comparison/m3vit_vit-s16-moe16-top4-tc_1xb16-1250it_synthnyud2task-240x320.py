# Comparison study: M3ViT with one task-conditioned router per MoE layer (input
# concat(token, e_t), e_t = MLP(one_hot(t))); everything else as the multi-gate config.
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_1xb16-1250it_synthnyud2task-240x320.py"]

model = dict(backbone=dict(router="task_conditioned", task_embed_dims=64))
