"""T5 embeddings in NVIDIA's pickle format: safe reading, atomic writing, fast batched encoding.

The format is described in docs/checkpoints.md.
"""

import importlib
import io
import logging
import pickle
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

EMBED_DIM = 1024
MAX_LENGTH = 512

# Exactly what a pickled numpy array needs, as numpy 1.x (`numpy.core`) and 2.x (`numpy._core`) write it under
# protocols 2 to 5. Anything else (os.system, builtins.eval, ...) is refused before it can run.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class UnsafePickleError(ValueError):
    """A pickle asked for something other than numpy arrays."""


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def __init__(self, file, source: str):
        super().__init__(file)
        self.source = source

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise UnsafePickleError(
                f"{self.source}: refusing to load {module}.{name}; an embedding pickle may only hold numpy arrays. "
                "Delete the file and rerun precompute_t5.py to regenerate it.")
        if module.startswith("numpy.core") and int(np.__version__.split(".")[0]) >= 2:
            module = "numpy._core" + module[len("numpy.core"):]  # numpy 1.x name, same function in numpy 2
        return getattr(importlib.import_module(module), name)


def safe_loads(data: bytes, source: str = "<bytes>"):
    """Unpickle bytes, admitting only numpy arrays and plain containers."""
    return _NumpyOnlyUnpickler(io.BytesIO(data), source).load()


def read_embedding(path) -> np.ndarray:
    """Read one NVIDIA embedding pickle: a list holding one (n_tokens, 1024) array. Raises naming the file."""
    path = Path(path)
    try:
        obj = safe_loads(path.read_bytes(), str(path))
    except UnsafePickleError:
        raise
    except Exception as e:  # truncated or not a pickle at all
        raise ValueError(f"{path}: unreadable embedding ({e}). Rerun precompute_t5.py (it encodes unreadable "
                         "files again).") from e
    array = obj[0] if isinstance(obj, (list, tuple)) and len(obj) == 1 else obj
    if not isinstance(array, np.ndarray) or array.ndim != 2 or array.shape[1] != EMBED_DIM or not (
            1 <= array.shape[0] <= MAX_LENGTH) or array.dtype not in (np.float16, np.float32):
        desc = f"{type(array).__name__} {getattr(array, 'shape', '')} {getattr(array, 'dtype', '')}"
        raise ValueError(f"{path}: expected a list holding one float16 array of shape (n_tokens<=512, 1024), "
                         f"found {desc}. Rerun precompute_t5.py (it encodes malformed files again).")
    if not np.isfinite(array).all():
        raise ValueError(f"{path}: the embedding holds NaN or Inf values. Rerun precompute_t5.py (it encodes "
                         "malformed files again); with --dtype fp32 if the T5 overflows in 16 bits.")
    return array


def write_embedding(path, array: np.ndarray) -> None:
    """Write NVIDIA's format (list of one float16 array, pickle protocol 4) atomically: temp file, then rename."""
    from .files import atomic_write

    with atomic_write(path) as f:
        pickle.dump([np.ascontiguousarray(array, dtype=np.float16)], f, protocol=4)


def pad_embedding(array: np.ndarray, max_length: int = MAX_LENGTH):
    """Zero-pad to (max_length, 1024) float32 and build the 0/1 token mask, as NVIDIA's loader does."""
    import torch

    n = min(array.shape[0], max_length)
    embedding = torch.zeros(max_length, EMBED_DIM, dtype=torch.float32)
    embedding[:n] = torch.from_numpy(np.asarray(array[:n], dtype=np.float32))
    mask = torch.zeros(max_length, dtype=torch.int64)
    mask[:n] = 1
    return embedding, mask


def resolve_text_encoder_dirs(path: str) -> tuple[str, str, dict]:
    """(encoder path, tokenizer path, from_pretrained kwargs) for the layouts precompute accepts."""
    p = Path(path)
    if (p / "text_encoder").is_dir() and (p / "tokenizer").is_dir():  # diffusers pipeline layout
        return str(p / "text_encoder"), str(p / "tokenizer"), {}
    if p.name == "text_encoder" and (p.parent / "tokenizer").is_dir():  # its text_encoder/ subfolder
        return str(p), str(p.parent / "tokenizer"), {}
    if p.exists() and not (p / "config.json").exists():
        raise FileNotFoundError(f"{path}: no T5 encoder here (expected config.json, or text_encoder/ and tokenizer/ "
                                "subfolders). Pass --text_encoder with a folder holding google-t5/t5-11b.")
    return path, path, {}  # a folder holding both, or a hub id


def load_text_encoder(path: str, device="cpu", dtype=None, load_in_8bit: bool = False):
    """Load (tokenizer, T5 encoder) in eval mode; 8-bit through bitsandbytes when asked. dtype None: bf16 on a GPU,
    fp32 on the CPU."""
    import torch
    from transformers import AutoTokenizer, BitsAndBytesConfig, T5EncoderModel

    encoder_path, tokenizer_path, _ = resolve_text_encoder_dirs(path)
    kwargs = {"dtype": dtype or (torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32)}
    if load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        kwargs["device_map"] = {"": device}
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        encoder = T5EncoderModel.from_pretrained(encoder_path, **kwargs).eval()
    except (OSError, ValueError) as e:  # no network for a hub id, a folder without the files: no fix named
        from .weight_files import one_sentence
        raise OSError(f"cannot load the T5 encoder {path!r} ({one_sentence(e)}); pass --text_encoder with a local "
                      "folder holding google-t5/t5-11b (README: Real weights).") from e
    if not load_in_8bit:
        encoder.to(device)
    return tokenizer, encoder


def encode_in_sorted_batches(order, batch_size: int, encode, finish) -> None:
    """Encode `order` (indices sorted by token count, so a batch pads only to its longest) batch by batch:
    encode(chunk) -> (host tensor, CUDA event or None), and finish(chunk, host tensor, event) for each batch on the
    CPU while the device already encodes the next one."""
    pending = None
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        out = encode(chunk)
        if pending is not None:
            finish(*pending)
        pending = (chunk, *out)
    if pending is not None:
        finish(*pending)


def to_host(hidden, dtype):
    """(hidden in dtype on the CPU, event): on a GPU converted there and copied out asynchronously into pinned memory
    (the event marks the copy's end); on the CPU converted now (event None)."""
    import torch

    if hidden.device.type != "cuda":
        return hidden.to(dtype), None
    out = torch.empty(hidden.shape, dtype=dtype, pin_memory=True)
    out.copy_(hidden, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    return out, copied


def encode_prompts(tokenizer, encoder, prompts: list[str], max_length: int = MAX_LENGTH, batch_size: int = 64,
                   on_batch=None, too_long: list | None = None) -> list[np.ndarray]:
    """Encode captions to float16 (n_tokens, 1024) arrays trimmed to their true length (with </s>).

    Captions are sorted by token count and batched so each batch pads only to its longest member; with T5's
    bidirectional attention and the padding masked out, this equals one-at-a-time encoding. On a GPU each batch's
    output is converted to float16 there and copied out asynchronously, and the CPU trims it while the GPU encodes
    the next batch. A caption over max_length tokens is cut to its first max_length: logged as a warning, or, given
    the list `too_long`, appended to it as (index, token count) for the caller to report once.
    """
    import torch

    full = [len(ids) for ids in tokenizer(prompts, verbose=False)["input_ids"]]
    for index, (prompt, n) in enumerate(zip(prompts, full)):
        if n <= max_length:
            continue
        if too_long is not None:
            too_long.append((index, n))
        else:
            logger.warning("prompt of %d tokens (%r...): the T5 encoder reads the first %d, the rest is dropped", n,
                           prompt[:60], max_length)
    lengths = [min(n, max_length) for n in full]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    device = next(encoder.parameters()).device
    results: list[np.ndarray | None] = [None] * len(prompts)

    def finish(chunk, hidden, copied):  # on the CPU, while the GPU already encodes the next batch
        if copied is not None:
            copied.synchronize()
        hidden = hidden.numpy()
        for row, i in enumerate(chunk):
            results[i] = np.array(hidden[row, :lengths[i]])
        if on_batch is not None:
            on_batch(len(chunk))

    def encode(chunk):
        tokens = tokenizer([prompts[i] for i in chunk], return_tensors="pt", padding="longest", truncation=True,
                           max_length=max_length)
        with torch.inference_mode():
            hidden = encoder(input_ids=tokens.input_ids.to(device, non_blocking=True),
                             attention_mask=tokens.attention_mask.to(device, non_blocking=True)).last_hidden_state
            # float16 on the device (bf16 -> fp16 rounds as bf16 -> fp32 -> fp16 does), copied out asynchronously
            return to_host(hidden, torch.float16)

    encode_in_sorted_batches(order, batch_size, encode, finish)
    return results


def embed_prompts(tokenizer, encoder, prompts: list[str]):
    """Prompts -> zero-padded T5 embeddings [B, 512, 1024] (fp32), exactly as the training data."""
    import torch
    return torch.stack([pad_embedding(a)[0] for a in encode_prompts(tokenizer, encoder, list(prompts))])


def embed_prompts_once(text_encoder: str, prompts: list[str], device, dtype=None, load_in_8bit: bool = False):
    """Load the T5, embed the prompts, free the T5: for callers that need no T5 afterwards (validation prompts,
    inference with --offload_text_encoder), so it never shares the GPU with the DiT."""
    import torch
    tokenizer, encoder = load_text_encoder(text_encoder, device, dtype, load_in_8bit=load_in_8bit)
    embeddings = embed_prompts(tokenizer, encoder, prompts)
    del encoder
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return embeddings


# ---------------------------------------------------------------- the text side of the Predict2 family (families.py)
FOLDER, SUFFIX, COLUMN = "t5_xxl", ".pickle", "t5_xxl"


def load_encoder(path: str, device="cpu", dtype=None, load_in_8bit: bool = False):
    """(tokenizer, T5 encoder): what encode_captions takes."""
    return load_text_encoder(path, device, dtype, load_in_8bit)


def encode_captions(encoder, captions, max_length=MAX_LENGTH, batch_size=64, on_batch=None, too_long=None):
    tokenizer, model = encoder
    return encode_prompts(tokenizer, model, captions, max_length, batch_size, on_batch, too_long)


def write_text(path, array: np.ndarray) -> None:
    write_embedding(path, array)


def read_text(path) -> np.ndarray:
    return read_embedding(path)


def to_column(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array, dtype=np.float16)


def from_column(value, source="row") -> np.ndarray:
    return np.asarray(value, dtype=np.float16)


def column_feature():
    import datasets
    return datasets.Array2D(shape=(None, EMBED_DIM), dtype="float16")


def sample_fields(array: np.ndarray) -> dict:
    """NVIDIA's sample entries: the zero-padded embedding [512, 1024] and its token mask [512]."""
    embedding, mask = pad_embedding(array)
    return {"t5_text_embeddings": embedding, "t5_text_mask": mask}


def placeholder_fields(like: dict | None = None) -> dict:
    return sample_fields(np.zeros((1, EMBED_DIM), dtype=np.float16))


def prompt_inputs(encoder, prompts: list[str], device):
    """Prompts -> zero-padded T5 embeddings [B, 512, 1024] (fp32) on `device`, exactly as the training data."""
    tokenizer, model = encoder
    return embed_prompts(tokenizer, model, prompts).to(device)


def model_inputs(batch: dict, to_device):
    return to_device(batch["t5_text_embeddings"])


def drop_captions(embeddings, keep):
    """NVIDIA's caption dropout: a dropped caption's embedding becomes zeros."""
    return embeddings * keep.view(-1, 1, 1).to(embeddings.dtype)
