"""Write the tiny CPU bundle: a learnable synthetic dataset and tiny models in save_pretrained layouts.

    python examples/tiny/make_assets.py [--output_dir examples/tiny/assets]

DIR/dataset/{images,metas}: coloured shapes on coloured backgrounds, captions naming colour and shape.
DIR/models/{transformer,vae,text_encoder,tokenizer}: a 2-block CosmosTransformer3DModel with the Cosmos-Predict2
structure, a tiny AutoencoderKLWan trained on these shapes (examples/tiny/vae, made by train_vae.py), a 1-layer T5
encoder with 1024-wide output and a locally built tokenizer.
DIR/models/anima/: a tiny Anima diffusers folder: transformer/ (the same tiny DiT shape), text_conditioner/ (the tiny
AnimaTextConditioner, every weight drawn), text_encoder/ (a 2-layer, 64-wide Qwen3Model), tokenizer/ (a Qwen-style
byte-level BPE trained on the captions), t5_tokenizer/ (the word-level T5-style tokenizer), vae/ (the trained tiny
VAE as an AutoencoderKLQwenImage: same weights), scheduler/ (FlowMatchEuler, shift 3) and a
modular_model_index.json (diffusers' ModularPipeline.from_pretrained runs it).
No network; seconds on a CPU. Then: python precompute_t5.py --dataset_path DIR/dataset --text_encoder DIR/models/text_encoder
(Anima: python precompute_t5.py --family anima --dataset_path DIR/dataset --text_encoder DIR/models/anima)
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cosmos_t2i.registry import anima_conditioner_config, transformer_config  # noqa: E402

# Two clearly different classes; position, size and shade vary inside each.
CLASSES = [
    {"caption": "a red circle on a blue background", "shape": "circle", "fg": (220, 30, 30), "bg": (30, 40, 200)},
    {"caption": "a yellow square on a green background", "shape": "square", "fg": (240, 220, 20), "bg": (20, 150, 40)},
]
EXTRA_WORDS = "a an the of on in with and image photo picture robot teal sks blue red green yellow white black " \
              "circle square triangle background small large bright dark".split()


def draw_sample(spec, rng, size=(96, 96)) -> Image.Image:
    """One image of a class: the shape at a random place and scale, colours jittered a little."""
    def jitter(colour):
        return tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in colour)
    width, height = size
    image = Image.new("RGB", size, jitter(spec["bg"]))
    radius = int(rng.integers(height // 5, height // 3))
    cx, cy = int(rng.integers(radius, width - radius)), int(rng.integers(radius, height - radius))
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if spec["shape"] == "circle" else draw.rectangle)(box, fill=jitter(spec["fg"]))
    return image


def write_dataset(root: Path, per_class: int, seed: int = 0) -> None:
    """images/*.jpg and metas/*.txt, names sorted so classes interleave."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "metas").mkdir(parents=True, exist_ok=True)
    for i in range(per_class):
        for c, spec in enumerate(CLASSES):
            name = f"sample_{i:03d}_{c}"
            draw_sample(spec, rng).save(root / "images" / f"{name}.jpg", quality=95)
            (root / "metas" / f"{name}.txt").write_text(spec["caption"] + "\n")


def write_tokenizer(folder: Path) -> None:
    """A word-level tokenizer with T5's special tokens (pad 0, </s> 1, unk 2) that appends </s>."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(EXTRA_WORDS) | {w for spec in CLASSES for w in spec["caption"].split()})
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=512)
    fast.save_pretrained(folder)


QWEN_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def write_qwen_tokenizer(folder: Path) -> int:
    """A Qwen-style byte-level BPE (Qwen2Tokenizer's normalizer, pre-tokenizer and decoder; no special tokens added
    to an encoding; pad <|endoftext|>) trained on the captions and EXTRA_WORDS. Returns its size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    template = Qwen2Tokenizer()._tokenizer  # the real pipeline around an empty vocabulary
    tok = Tokenizer(models.BPE())
    tok.normalizer, tok.pre_tokenizer = template.normalizer, template.pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([spec["caption"] for spec in CLASSES] + [" ".join(EXTRA_WORDS)], trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ") if isinstance(m, str) else m) for m in state["merges"]]
    qwen = Qwen2Tokenizer(vocab=state["vocab"], merges=merges, model_max_length=32768)
    qwen.save_pretrained(folder)
    return len(qwen)


def write_anima(out: Path, vae_folder: Path) -> None:
    """models/anima: a tiny Anima diffusers folder (see the module docstring), drawn from its own seed."""
    from diffusers import (AnimaTextConditioner, AutoencoderKLQwenImage, AutoencoderKLWan, CosmosTransformer3DModel,
                           FlowMatchEulerDiscreteScheduler)
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(1)
    CosmosTransformer3DModel(**transformer_config("tiny")).save_pretrained(out / "transformer")
    conditioner = AnimaTextConditioner(**anima_conditioner_config("tiny"))
    for name, p in conditioner.named_parameters():  # diffusers zero-initialises some layers: make every tensor count
        p.data = 1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p)
    conditioner.save_pretrained(out / "text_conditioner")

    vocab = write_qwen_tokenizer(out / "tokenizer")
    write_tokenizer(out / "t5_tokenizer")
    config = Qwen3Config(vocab_size=-(-vocab // 64) * 64, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=0, bos_token_id=None, eos_token_id=0)
    Qwen3Model(config).save_pretrained(out / "text_encoder")

    wan = AutoencoderKLWan.from_pretrained(vae_folder)
    c = wan.config
    assert (c.in_channels, c.out_channels, c.is_residual, c.patch_size, c.decoder_base_dim) == (3, 3, False, None, None)
    qwen_vae = AutoencoderKLQwenImage(
        base_dim=c.base_dim, z_dim=c.z_dim, dim_mult=list(c.dim_mult), num_res_blocks=c.num_res_blocks,
        attn_scales=list(c.attn_scales), temperal_downsample=list(c.temperal_downsample), dropout=c.dropout,
        input_channels=c.in_channels, latents_mean=list(c.latents_mean), latents_std=list(c.latents_std))
    qwen_vae.load_state_dict(wan.state_dict(), strict=True)
    qwen_vae.save_pretrained(out / "vae")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(out / "scheduler")
    write_modular_index(out)


def write_modular_index(out: Path) -> None:
    """modular_model_index.json, so that diffusers' ModularPipeline.from_pretrained(out) builds its Anima pipeline;
    no component names a repository, so diffusers loads each from its subfolder here (the folder can move)."""
    import diffusers

    components = {"scheduler": ("diffusers", "FlowMatchEulerDiscreteScheduler"),
                  "t5_tokenizer": ("transformers", "TokenizersBackend"),  # the word-level stand-in for T5's
                  "text_conditioner": ("diffusers", "AnimaTextConditioner"),
                  "text_encoder": ("transformers", "Qwen3Model"), "tokenizer": ("transformers", "Qwen2Tokenizer"),
                  "transformer": ("diffusers", "CosmosTransformer3DModel"),
                  "vae": ("diffusers", "AutoencoderKLQwenImage")}
    index = {"_class_name": "AnimaModularPipeline", "_diffusers_version": diffusers.__version__,
             "_blocks_class_name": "AnimaAutoBlocks"}
    for name, (library, cls) in components.items():
        index[name] = [library, cls, {"pretrained_model_name_or_path": None, "subfolder": name, "revision": None,
                                      "variant": None, "type_hint": [library, cls]}]
    (out / "modular_model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(Path(__file__).parent / "assets"))
    parser.add_argument("--per_class", type=int, default=8, help="images per caption class")
    args = parser.parse_args()

    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel
    from transformers import T5Config, T5EncoderModel

    out = Path(args.output_dir)
    torch.manual_seed(0)
    write_dataset(out / "dataset", args.per_class)
    write_tokenizer(out / "models" / "tokenizer")
    write_tokenizer(out / "models" / "text_encoder")  # also beside the encoder, so either folder works alone

    t5_config = T5Config(vocab_size=64, d_model=1024, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                         relative_attention_num_buckets=8, feed_forward_proj="relu", dropout_rate=0.0)
    T5EncoderModel(t5_config).save_pretrained(out / "models" / "text_encoder")

    CosmosTransformer3DModel(**transformer_config("tiny")).save_pretrained(out / "models" / "transformer")

    # A real (tiny) autoencoder trained on these shapes by train_vae.py, so that generated latents decode to images
    AutoencoderKLWan.from_pretrained(Path(__file__).parent / "vae").save_pretrained(out / "models" / "vae")
    with torch.random.fork_rng():  # the Predict2 models above stay as they were
        write_anima(out / "models" / "anima", Path(__file__).parent / "vae")
    print(f"wrote {2 * args.per_class} images and tiny models to {out}")


if __name__ == "__main__":
    main()
