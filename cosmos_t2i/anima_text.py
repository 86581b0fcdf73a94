"""Anima's text side (families.py): Qwen3 hidden states and T5 token ids, precomputed per caption.

Anima conditions its DiT through a text adapter (diffusers' `AnimaTextConditioner`) that reads two encodings of the
caption, both made here exactly as diffusers' `AnimaTextEncoderStep.encode_prompt` makes them for one caption:

    qwen      the last hidden state of the Qwen3 text encoder (Qwen3-0.6B: 1024 wide) for the caption's tokens. The
              Qwen tokenizer adds no special tokens, so the empty caption has none (0 rows).
    t5_ids    the caption's ids under the T5 tokenizer, ending with </s> (T5_EOS = 1); the empty caption is [1].

A caption over MAX_LENGTH (512) tokens in either tokenizer is cut to its first 512 (</s> kept last), as the pipeline
cuts it, and reported.

File format, `<dataset>/anima_text/<image stem>.safetensors` (one per image), and the same bytes as the `anima_text`
column (`datasets.Value("binary")`) of a Hugging Face dataset: a safetensors file with metadata
{"format": "cosmos_t2i.anima_text.v1"} and exactly two tensors,
    "qwen"     float16, bfloat16 or float32, shape (n_qwen_tokens, width), 0 <= n_qwen_tokens <= 512; rows of the
               real tokens only (no padding), in the encoder's dtype (bfloat16 on a GPU, float32 on the CPU by
               default), all finite
    "t5_ids"   int32 (written so; any integer type reads), shape (n_t5_tokens,), 1 <= n_t5_tokens <= 512, the ids
               including the final </s>, non-negative
Nothing is pickled. Reading checks all of this and names the file and the fix (rerun precompute_t5.py --family anima,
which encodes damaged files again).

A training sample carries the fields of `sample_fields`, fixed at 512 tokens so that batches stack: "qwen_states"
(float32, zero-padded), "qwen_mask", "t5_ids" (zero-padded), "t5_mask" (int64 0/1). `model_inputs` makes the adapter's
inputs of them (anima.text_inputs); padding changes nothing the adapter computes. Caption dropout (`drop_captions`)
and the sampler's negative prompt use the empty caption: no Qwen state at all and the T5 ids [</s>].
"""

import json
import logging
import struct
from pathlib import Path

logger = logging.getLogger(__name__)

FOLDER, SUFFIX, COLUMN = "anima_text", ".safetensors", "anima_text"
MAX_LENGTH = 512
T5_EOS = 1              # T5's </s>: every T5 encoding ends with it, and the empty caption is [</s>] alone
QWEN_WIDTH = 1024       # Qwen3-0.6B's hidden size (the width of placeholder_fields without a model to copy)
FORMAT = "cosmos_t2i.anima_text.v1"
FIX = ("Rerun precompute_t5.py --family anima (it encodes damaged files again; a Hugging Face dataset needs "
       "--overwrite).")


# ---------------------------------------------------------------- the encoder
def resolve_encoder_dirs(path) -> tuple[str, str, str, dict]:
    """(Qwen3 encoder, Qwen tokenizer, T5 tokenizer, from_pretrained kwargs) for an Anima diffusers folder, its
    text_encoder/ folder (tokenizer/ and t5_tokenizer/ beside it) or a hub id (its subfolders)."""
    p = Path(path)
    if (p / "text_encoder").is_dir():
        root, encoder = p, p / "text_encoder"
    elif p.name == "text_encoder" and p.is_dir():
        root, encoder = p.parent, p
    elif p.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") != 1:  # not a hub id
        raise OSError(f"{path}: no Anima text encoder here; expected an Anima diffusers folder with text_encoder/ "
                      "(Qwen3), tokenizer/ (Qwen) and t5_tokenizer/ subfolders, or its text_encoder/ folder with the "
                      "two tokenizer folders beside it.")
    else:  # a hub id: its subfolders (from the local Hugging Face cache when offline)
        return str(path), str(path), str(path), {"text_encoder": {"subfolder": "text_encoder"},
                                                 "tokenizer": {"subfolder": "tokenizer"},
                                                 "t5_tokenizer": {"subfolder": "t5_tokenizer"}}
    missing = [f"{name}/" for name in ("tokenizer", "t5_tokenizer") if not (root / name).is_dir()]
    missing += [] if (encoder / "config.json").is_file() else ["text_encoder/config.json"]
    if missing:
        raise OSError(f"{path}: an Anima text encoder needs text_encoder/ (Qwen3), tokenizer/ and t5_tokenizer/ side "
                      f"by side in {root}; missing {', '.join(missing)}.")
    return str(encoder), str(root / "tokenizer"), str(root / "t5_tokenizer"), {}


def load_encoder(path, device="cpu", dtype=None, load_in_8bit: bool = False):
    """(Qwen tokenizer, T5 tokenizer, Qwen3 model in eval mode): what encode_captions takes. dtype None: bf16 on a
    GPU, fp32 on the CPU; 8-bit weights through bitsandbytes when asked. Raises OSError naming the path."""
    import torch
    from transformers import AutoTokenizer, BitsAndBytesConfig, Qwen3Model

    encoder_path, qwen_path, t5_path, sub = resolve_encoder_dirs(path)
    kwargs = {"dtype": dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    try:
        qwen_tokenizer = AutoTokenizer.from_pretrained(qwen_path, **sub.get("tokenizer", {}))
        t5_tokenizer = AutoTokenizer.from_pretrained(t5_path, **sub.get("t5_tokenizer", {}))
        model = Qwen3Model.from_pretrained(encoder_path, **sub.get("text_encoder", {}), **kwargs).eval()
    except (OSError, ValueError) as e:  # no network for a hub id, a folder without the files
        from .weight_files import one_sentence
        raise OSError(f"cannot load the Anima text encoder {str(path)!r} ({one_sentence(e)}); pass --text_encoder "
                      "with a local Anima diffusers folder (text_encoder/, tokenizer/, t5_tokenizer/).") from e
    if not load_in_8bit:
        model.to(device)
    return qwen_tokenizer, t5_tokenizer, model


def encode_captions(encoder, captions, max_length=MAX_LENGTH, batch_size=64, on_batch=None, too_long=None):
    """One item {"qwen": [n, width], "t5_ids": int32 [m]} per caption, equal to diffusers' encode_prompt of that
    caption alone (its Qwen states trimmed to the mask, its T5 ids with </s>).

    Captions are sorted by Qwen token count and batched, so a batch pads only to its longest member. Padding is on
    the right whatever the tokenizer says: Qwen3 is causal and numbers positions from the first token, so right
    padding leaves every real token's state as it is alone (left padding would shift its positions). On a GPU each
    batch is copied out asynchronously while the next one encodes. A caption over max_length tokens (either
    tokenizer) is cut to its first max_length: appended to `too_long` as (index, token count), else logged.
    """
    import torch

    from .t5 import encode_in_sorted_batches, to_host

    qwen_tokenizer, t5_tokenizer, model = encoder
    captions = list(captions)
    if not captions:
        return []
    qwen_full = [len(ids) for ids in qwen_tokenizer(captions, verbose=False)["input_ids"]]
    t5_full = [len(ids) for ids in t5_tokenizer(captions, verbose=False)["input_ids"]]
    for index, (caption, nq, nt) in enumerate(zip(captions, qwen_full, t5_full)):
        if max(nq, nt) <= max_length:
            continue
        if too_long is not None:
            too_long.append((index, max(nq, nt)))
        else:
            logger.warning("caption of %d tokens (%r...): Anima's text encoders read the first %d, the rest is "
                           "dropped", max(nq, nt), caption[:60], max_length)
    t5_ids = t5_tokenizer(captions, truncation=True, max_length=max_length, verbose=False)["input_ids"]
    lengths = [min(n, max_length) for n in qwen_full]
    order = sorted(range(len(captions)), key=lambda i: lengths[i])
    device = next(model.parameters()).device
    results: list = [None] * len(captions)

    def finish(chunk, hidden, copied):  # on the CPU, while the GPU already encodes the next batch
        if copied is not None:
            copied.synchronize()
        for row, i in enumerate(chunk):
            results[i] = {"qwen": hidden[row, :lengths[i]].clone(),
                          "t5_ids": torch.tensor(t5_ids[i], dtype=torch.int32)}
        if on_batch is not None:
            on_batch(len(chunk))

    def encode(chunk):
        if lengths[chunk[-1]] == 0:  # empty captions only: no token, no state (the pipeline masks its dummy token)
            return torch.zeros(len(chunk), 0, model.config.hidden_size, dtype=model.dtype), None
        tokens = qwen_tokenizer([captions[i] for i in chunk], return_tensors="pt", padding="longest",
                                padding_side="right", truncation=True, max_length=max_length)
        with torch.inference_mode():
            hidden = model(input_ids=tokens.input_ids.to(device, non_blocking=True),
                           attention_mask=tokens.attention_mask.to(device, non_blocking=True)).last_hidden_state
            return to_host(hidden, hidden.dtype)

    encode_in_sorted_batches(order, batch_size, encode, finish)
    return results


# ---------------------------------------------------------------- files and columns
def to_column(item) -> bytes:
    """The item as safetensors bytes (a file's bytes; the value of a Hugging Face dataset's column)."""
    import torch
    from safetensors.torch import save

    return save({"qwen": item["qwen"].detach().cpu().contiguous(),
                 "t5_ids": item["t5_ids"].detach().cpu().to(torch.int32).contiguous()}, metadata={"format": FORMAT})


def write_text(path, item) -> None:
    """Write one caption's item atomically (temporary file, then rename)."""
    from .files import atomic_write

    data = to_column(item)
    with atomic_write(path) as f:
        f.write(data)


def _header(data: bytes) -> dict:
    """The safetensors JSON header, checked before any tensor is read."""
    (size,) = struct.unpack("<Q", data[:8])
    if len(data) < 8 + size:
        raise ValueError("truncated")
    return json.loads(data[8:8 + size])


def from_column(value, source="row") -> dict:
    """Parse and validate an item's bytes; raises ValueError naming `source` and the fix."""
    import torch
    from safetensors.torch import load

    try:
        data = bytes(value)
        header = _header(data)
        tensors = load(data)
    except Exception as e:  # truncated, not safetensors at all, a missing file
        raise ValueError(f"{source}: unreadable Anima text encoding ({e.__class__.__name__}: {e}). {FIX}") from e
    fmt = (header.get("__metadata__") or {}).get("format")
    if fmt != FORMAT or set(tensors) != {"qwen", "t5_ids"}:
        raise ValueError(f"{source}: not an Anima text encoding (format {fmt!r}, tensors {sorted(tensors)}; expected "
                         f"format {FORMAT!r} with 'qwen' and 't5_ids'). {FIX}")
    qwen, ids = tensors["qwen"], tensors["t5_ids"]
    if qwen.dtype not in (torch.float16, torch.bfloat16, torch.float32) or qwen.ndim != 2 or not (
            qwen.shape[0] <= MAX_LENGTH and qwen.shape[1] >= 1):
        raise ValueError(f"{source}: 'qwen' must be a float16/bfloat16/float32 array (n_tokens<={MAX_LENGTH}, width), "
                         f"found {qwen.dtype} {tuple(qwen.shape)}. {FIX}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool or ids.ndim != 1 or not (
            1 <= ids.shape[0] <= MAX_LENGTH):
        raise ValueError(f"{source}: 't5_ids' must be integer ids (n_tokens,) with 1 <= n_tokens <= {MAX_LENGTH}, "
                         f"found {ids.dtype} {tuple(ids.shape)}. {FIX}")
    if (ids < 0).any() or (ids.to(torch.int64) >= 2 ** 31).any():
        raise ValueError(f"{source}: 't5_ids' holds ids outside 0..2^31-1. {FIX}")
    if not torch.isfinite(qwen).all():
        raise ValueError(f"{source}: 'qwen' holds NaN or Inf values. {FIX} With --dtype fp32 if the encoder "
                         "overflows in 16 bits.")
    return {"qwen": qwen, "t5_ids": ids.to(torch.int32)}


def read_text(path) -> dict:
    """Read and validate one caption's file; raises ValueError naming the file and the fix."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: unreadable Anima text encoding ({e.__class__.__name__}). {FIX}") from e
    return from_column(data, str(path))


def column_feature():
    import datasets
    return datasets.Value("binary")


# ---------------------------------------------------------------- samples, batches and the adapter's inputs
def sample_fields(item) -> dict:
    """A sample's text at fixed shapes: Qwen states [512, width] float32 zero-padded with their mask, T5 ids [512]
    zero-padded with theirs (int64)."""
    import torch

    qwen, ids = item["qwen"], item["t5_ids"]
    n, m = qwen.shape[0], ids.shape[0]
    states = torch.zeros(MAX_LENGTH, qwen.shape[1], dtype=torch.float32)
    states[:n] = qwen.to(torch.float32)
    t5_ids = torch.zeros(MAX_LENGTH, dtype=torch.int64)
    t5_ids[:m] = ids.to(torch.int64)
    qwen_mask, t5_mask = torch.zeros(MAX_LENGTH, dtype=torch.int64), torch.zeros(MAX_LENGTH, dtype=torch.int64)
    qwen_mask[:n], t5_mask[:m] = 1, 1
    return {"qwen_states": states, "qwen_mask": qwen_mask, "t5_ids": t5_ids, "t5_mask": t5_mask}


def empty_item(width: int = QWEN_WIDTH) -> dict:
    """The empty caption's encoding: no Qwen token, the T5 ids [</s>]."""
    import torch
    return {"qwen": torch.zeros(0, width), "t5_ids": torch.tensor([T5_EOS], dtype=torch.int32)}


def placeholder_fields(like=None) -> dict:
    """The empty caption's sample fields (for a sample that could not be read), as wide as `like`'s Qwen states
    when given, else Qwen3-0.6B's 1024."""
    return sample_fields(empty_item(like["qwen_states"].shape[-1] if like is not None else QWEN_WIDTH))


def model_inputs(batch: dict, to_device) -> dict:
    """The adapter's inputs (anima.text_inputs) of a batch's four text fields."""
    from .anima import text_inputs

    return text_inputs(to_device(batch["qwen_states"]), to_device(batch["qwen_mask"]), to_device(batch["t5_ids"]),
                       to_device(batch["t5_mask"]))


def drop_captions(text: dict, keep) -> dict:
    """Caption dropout: samples with keep == 0 (float [B] on the device) get the empty caption's inputs (no Qwen
    state, T5 ids [</s>]), as the pipeline's "" encodes. All on the device: no host synchronisation."""
    import torch

    kept = (keep > 0).view(-1, 1)
    states, qwen_mask = text["source_hidden_states"], text["source_attention_mask"]
    ids, t5_mask = text["target_input_ids"], text["target_attention_mask"]
    first = torch.zeros_like(ids[:1])
    first[:, 0] = 1
    return {**text,
            "source_hidden_states": torch.where(kept.unsqueeze(-1), states, torch.zeros_like(states)),
            "source_attention_mask": torch.where(kept, qwen_mask, torch.zeros_like(qwen_mask)),
            "target_input_ids": torch.where(kept, ids, first * T5_EOS),
            "target_attention_mask": torch.where(kept, t5_mask, first.to(t5_mask.dtype))}


def prompt_inputs(encoder, prompts, device, dtype=None) -> dict:
    """Prompts -> the adapter's inputs (anima.text_inputs), padded to 512 exactly as the training data; Qwen states
    in `dtype` (default float32) on `device`."""
    import torch

    fields = [sample_fields(item) for item in encode_captions(encoder, list(prompts))]
    batch = {k: torch.stack([f[k] for f in fields]) for k in fields[0]}
    batch["qwen_states"] = batch["qwen_states"].to(dtype or torch.float32)
    return model_inputs(batch, lambda t: t.to(device))
