"""Model sizes (DiT configs and per-size defaults) and NVIDIA's resolution tables."""

# Shared by every Cosmos-Predict2 Text2Image DiT, in diffusers' config names.
COMMON_CONFIG = dict(
    in_channels=16,
    out_channels=16,
    mlp_ratio=4.0,
    text_embed_dim=1024,
    adaln_lora_dim=256,
    max_size=(128, 240, 240),
    patch_size=(1, 2, 2),
    rope_scale=(1.0, 4.0, 4.0),
    concat_padding_mask=True,
    extra_pos_embed_type=None,
)

# One entry per --model_size; `fsdp_config` names the accelerate config recommended for several GPUs.
MODEL_SIZES = {
    "0.6B": dict(config=dict(num_attention_heads=20, attention_head_dim=64, num_layers=20),
                 params=597_536_000, fsdp_config="accelerate_configs/fsdp_2b.yaml"),
    "2B": dict(config=dict(num_attention_heads=16, attention_head_dim=128, num_layers=28),
               params=1_956_405_248, fsdp_config="accelerate_configs/fsdp_2b.yaml"),
    "14B": dict(config=dict(num_attention_heads=40, attention_head_dim=128, num_layers=36),
                params=14_265_265_152, fsdp_config="accelerate_configs/fsdp_14b.yaml"),
    # The CPU bundle of examples/tiny: same structure, toy widths; 1024-wide cross-attention keeps the T5 format.
    "tiny": dict(config=dict(num_attention_heads=2, attention_head_dim=16, num_layers=2, adaln_lora_dim=32),
                 params=None, fsdp_config="accelerate_configs/fsdp_2b.yaml"),
}

# Anima's text adapter (diffusers' AnimaTextConditioner) per DiT size: the released model's (diffusers' defaults:
# Qwen3-0.6B's 1024-wide states in, T5's 32128-id vocabulary as queries) and the tiny bundle's (64-wide toy Qwen3,
# its 64-id word tokenizer).
ANIMA_CONDITIONERS = {
    "2B": dict(source_dim=1024, target_dim=1024, model_dim=1024, num_layers=6, num_attention_heads=16,
               target_vocab_size=32128),
    "tiny": dict(source_dim=64, target_dim=1024, model_dim=64, num_layers=2, num_attention_heads=4,
                 target_vocab_size=64),
}

# NVIDIA's IMAGE_RES_SIZE_INFO, (width, height) per resolution class and aspect ratio (docs/sampling.md).
RESOLUTIONS = {
    "1024": {"1:1": (1024, 1024), "4:3": (1168, 880), "3:4": (880, 1168), "16:9": (1360, 768), "9:16": (768, 1360)},
    "720": {"1:1": (960, 960), "4:3": (960, 704), "3:4": (704, 960), "16:9": (1280, 704), "9:16": (704, 1280)},
    "512": {"1:1": (512, 512), "4:3": (640, 512), "3:4": (512, 640), "16:9": (640, 384), "9:16": (384, 640)},
    "480": {"1:1": (480, 480), "4:3": (640, 480), "3:4": (480, 640), "16:9": (768, 432), "9:16": (432, 768)},
}

_SHAPE_KEYS = ("num_attention_heads", "attention_head_dim", "num_layers")


def transformer_config(model_size: str) -> dict:
    """Full diffusers `CosmosTransformer3DModel` config for a registry key."""
    if model_size not in MODEL_SIZES:
        raise ValueError(f"Unknown model size {model_size!r}; choose one of {sorted(MODEL_SIZES)}.")
    return {**COMMON_CONFIG, **MODEL_SIZES[model_size]["config"]}


def anima_conditioner_config(model_size: str) -> dict:
    """The AnimaTextConditioner config paired with a DiT size (Anima is released at the 2B shape)."""
    if model_size not in ANIMA_CONDITIONERS:
        raise ValueError(f"Anima comes at sizes {sorted(ANIMA_CONDITIONERS)}, not {model_size!r}.")
    return dict(ANIMA_CONDITIONERS[model_size])


def size_of_config(config: dict) -> str | None:
    """The registry key whose shape matches a transformer config, or None."""
    for name in MODEL_SIZES:
        reference = transformer_config(name)
        if all(config.get(k) == reference[k] for k in _SHAPE_KEYS + ("adaln_lora_dim",)):
            return name
    return None


def check_size_matches(model_size: str | None, config: dict, where: str) -> None:
    """Raise if `--model_size` disagrees with a diffusers folder's config.json (the folder wins otherwise)."""
    if model_size is None:
        return
    expected = transformer_config(model_size)
    wrong = {k: (config.get(k), expected[k]) for k in _SHAPE_KEYS if config.get(k) != expected[k]}
    if wrong:
        detail = ", ".join(f"{k}={have} (the {model_size} model has {want})" for k, (have, want) in wrong.items())
        found = size_of_config(config)
        hint = f" It looks like --model_size {found}." if found else ""
        raise ValueError(f"{where} does not hold a {model_size} model: {detail}.{hint} "
                         "Pass the matching --model_size or leave it out for a diffusers folder.")


def image_size_for(resolution: str, aspect_ratio: str) -> tuple[int, int]:
    """(height, width) for a resolution class and aspect ratio from NVIDIA's table."""
    width, height = RESOLUTIONS[resolution][aspect_ratio]
    return height, width
