# Runtime shared by every M3ViT config: mmseg's runtime plus the plugin.
# A user config that inherits any config here gets the plugin imported and registered
# (custom_imports) and mmseg's registries as default scope, so mmseg's own tools work too.
_base_ = ["mmseg::_base_/default_runtime.py"]

custom_imports = dict(imports=["mmseg_m3vit"], allow_failed_imports=False)
default_scope = "mmseg"
# mmengine's runner with a short console log (hook table at DEBUG, environment and config
# text in the log file only); tools/train.py and tools/test.py build it, as mmseg's do.
runner_type = "M3ViTRunner"

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
    # on machines without CUDA, tools/train.py starts gloo instead of nccl
    dist_cfg=dict(backend="nccl"),
)
# mmengine's DDP wrapper, also usable for CPU processes (gloo); experts unused in a step
# receive zero gradients (stacked expert weights), so no unused-parameter search is needed.
model_wrapper_cfg = dict(type="CPUAwareDistributedDataParallel", find_unused_parameters=False)
# Stop on a NaN/inf loss (naming task and iteration) before the iteration is saved;
# write only finite checkpoints, resume strictly, keep one best checkpoint after a resume.
custom_hooks = [dict(type="NonFiniteLossHook"), dict(type="CheckpointGuardHook")]
randomness = dict(seed=0)
# mmseg's SegTTAModel only merges pred_sem_seg; multi-task TTA is not provided.
tta_model = None
