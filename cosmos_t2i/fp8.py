"""Float8 matmuls for the transformer blocks (opt-in `--fp8`), through torchao.

Training: torchao's Float8Linear (dynamic per-tensor scales; e4m3 forward, e5m2 gradients). The weights stay
ordinary fp32/bf16 parameters, so optimizer, EMA, FSDP and checkpoints are unchanged.
Inference: torchao's dynamic float8 activations x float8 weights with one scale per row (bf16 model).

Only the blocks' large projections are converted (attention q/k/v/out, cross-attention, feed-forward); the small
AdaLN-LoRA, embedding and output layers stay in bf16: their matmuls are a sliver of the FLOPs and their row count
(the batch) is below what float8 kernels accept.
"""

import torch

# (major, minor) compute capability: float8 tensor cores arrived with Ada (8.9); row-wise scales need Hopper (9.0)
MIN_CAPABILITY = {"training": (8, 9), "inference": (9, 0)}


def fp8_unavailable(purpose: str) -> str | None:
    """Why --fp8 cannot run here (purpose: "training" or "inference"), or None when it can."""
    need = MIN_CAPABILITY[purpose]
    if not torch.cuda.is_available():
        return f"--fp8 needs an NVIDIA GPU with float8 tensor cores (compute capability {need[0]}.{need[1]}+, e.g. " \
               "H100); none is visible here. Leave out --fp8 to run in bf16."
    capability = torch.cuda.get_device_capability()
    if capability < need:
        return f"--fp8 {purpose} needs compute capability {need[0]}.{need[1]}+ (H100/H200/B200); " \
               f"{torch.cuda.get_device_name()} has {capability[0]}.{capability[1]}. Leave out --fp8 to run in bf16."
    import importlib.util
    if importlib.util.find_spec("torchao") is None:
        return "--fp8 uses torchao's float8 kernels: pip install torchao (or leave out --fp8)."
    return None


def is_fp8_target(module: torch.nn.Module, name: str) -> bool:
    """A block's attention or feed-forward projection whose sizes float8 kernels accept (multiples of 16)."""
    return (isinstance(module, torch.nn.Linear) and name.startswith("transformer_blocks.")
            and (".attn" in name or ".ff." in name)
            and module.in_features % 16 == 0 and module.out_features % 16 == 0)


def convert_to_fp8_training(model: torch.nn.Module) -> int:
    """Swap the block projections for torchao Float8Linear in place (before FSDP and compile); returns how many.
    State-dict keys, shapes and dtypes stay as they were."""
    from torchao.float8 import convert_to_float8_training

    count = sum(is_fp8_target(m, n) for n, m in model.named_modules())
    convert_to_float8_training(model, module_filter_fn=lambda m, n: is_fp8_target(m, n))
    return count


def quantize_for_fp8_inference(model: torch.nn.Module) -> int:
    """Store the block projections as float8 weights (row-wise scales) and run them as float8 x float8 matmuls with
    activations quantized per row on the fly; returns how many. The model must be bf16."""
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, quantize_

    if model.dtype != torch.bfloat16:
        raise ValueError(f"--fp8 inference quantizes a bf16 model; this one is {model.dtype} (use --dtype bf16).")
    count = sum(is_fp8_target(m, n) for n, m in model.named_modules())
    # a lower bound on each row's absolute maximum: an all-zero row (the unconditional branch's zero text embedding,
    # T5 padding) would otherwise get scale 0 and turn into NaN
    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow(), activation_value_lb=1e-12)
    quantize_(model, config, filter_fn=lambda m, n: is_fp8_target(m, n))
    return count
