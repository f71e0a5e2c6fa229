# Router ablation: one task-conditioned router per MoE layer, input concat(token, e_t)
# with e_t = MLP(one_hot(t)) (docs/model.md s. 1; paper: 45.3 / 0.595, dm +0.74).
_base_ = ["./m3vit_vit-s16-moe16-top4-mg_2xb8-5k_nyud2task-480x640.py"]

model = dict(backbone=dict(router="task_conditioned", task_embed_dims=64))
