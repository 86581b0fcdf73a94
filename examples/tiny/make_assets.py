"""Write the tiny CPU bundle: a learnable synthetic dataset and tiny models in save_pretrained layouts.

    python examples/tiny/make_assets.py [--output_dir examples/tiny/assets]

DIR/dataset/{images,metas}: coloured shapes on coloured backgrounds, captions naming colour and shape.
DIR/models/{transformer,vae,text_encoder,tokenizer}: a 2-block CosmosTransformer3DModel with the Cosmos-Predict2
structure, a tiny AutoencoderKLWan trained on these shapes (examples/tiny/vae, made by train_vae.py), a 1-layer T5
encoder with 1024-wide output and a locally built tokenizer.
No network; seconds on a CPU. Then: python precompute_t5.py --dataset_path DIR/dataset --text_encoder DIR/models/text_encoder
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from cosmos_t2i.registry import transformer_config  # noqa: E402

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
    print(f"wrote {2 * args.per_class} images and tiny models to {out}")


if __name__ == "__main__":
    main()
