"""Pre-compute a dataset's text encodings: metas/*.txt -> t5_xxl/*.pickle (Cosmos-Predict2, NVIDIA's format) or
anima_text/*.safetensors (--family anima).

    python precompute_t5.py --dataset_path datasets/custom_text2image_dataset/
    python precompute_t5.py --family anima --dataset_path DATASET --text_encoder ANIMA_DIFFUSERS_FOLDER

predict2: each pickle holds a list with one float16 array (n_tokens, 1024), trimmed to the caption's true token count
(</s> included), so files load both here and in NVIDIA's repository.
anima: each safetensors file holds the caption's Qwen3 hidden states ("qwen", n_tokens x width) and its T5 token ids
("t5_ids", with </s>), as diffusers' Anima pipeline encodes them (cosmos_t2i/anima_text.py, docs/anima.md).
Captions are sorted by length and batched, so a batch pads only to its longest caption. Files already written and
well-formed are skipped (a killed run resumes; unreadable or malformed ones are encoded again) unless --overwrite
re-encodes all. Under `accelerate launch` with several processes the files are split across processes. With
--dataset_name (a Hugging Face dataset) a copy is saved with the encodings as a column (t5_xxl or anima_text).
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cosmos_t2i.cli import one_line_errors, run_main
from cosmos_t2i.data import list_images
from cosmos_t2i.families import FAMILIES, get_family

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# The progress bar's label and whose encoder cuts long captions, per family (words only)
WORDS = {"predict2": ("T5", "NVIDIA's encoder"), "anima": ("Qwen3", "diffusers' Anima pipeline")}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="predict2",
                        help="model family: predict2 (T5-XXL embeddings in t5_xxl/) or anima (Qwen3 states and T5 ids "
                             "in anima_text/)")
    parser.add_argument("--dataset_path", "--dataset_dir", dest="dataset_path",
                        help="dataset folder holding images/ and metas/ (the seed's layout)")
    parser.add_argument("--dataset_name", help="instead: a Hugging Face dataset (save_to_disk folder, imagefolder "
                                               "or hub id); writes a copy with a t5_xxl (anima: anima_text) column")
    parser.add_argument("--caption_column", default="text", help="caption column of --dataset_name")
    parser.add_argument("--split", default="train", help="split of --dataset_name")
    parser.add_argument("--output_dataset", help="where --dataset_name's copy goes (default: <name>_t5xxl, anima: "
                                                 "<name>_animatext)")
    parser.add_argument("--text_encoder", default=None,
                        help="predict2: the T5 encoder (default google-t5/t5-11b): hub id, folder with "
                             "encoder+tokenizer, a diffusers folder with text_encoder/ and tokenizer/, or that "
                             "text_encoder/ folder. anima: an Anima diffusers folder (default circlestone-labs/Anima-Base-v1.0-Diffusers) "
                             "with text_encoder/, tokenizer/ and t5_tokenizer/, or its text_encoder/ folder")
    parser.add_argument("--max_length", type=int, default=512, help="token limit (both families: 512)")
    parser.add_argument("--batch_size", type=int, default=128, help="captions per encoder forward")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="encoder dtype; fp32 reproduces NVIDIA exactly (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--load_in_8bit", action="store_true", help="8-bit encoder weights (bitsandbytes)")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the encoder (dynamic shapes); pays off from a few thousand captions")
    parser.add_argument("--overwrite", action="store_true", help="re-encode files that already exist")
    parser.add_argument("--prompt", default=None,
                        help="one caption for every image (NVIDIA's cosmos_nemo_assets variant); metas/ is not read")
    parser.add_argument("--cache_dir", default=None, help="accepted for NVIDIA compatibility; unused")
    args = one_line_errors(parser).parse_args(argv)
    if bool(args.dataset_path) == bool(args.dataset_name):
        parser.error("give exactly one of --dataset_path (the seed's folder layout) and --dataset_name.")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}.")
    limit = get_family(args.family).text.MAX_LENGTH
    if not 1 <= args.max_length <= limit:
        parser.error(f"--max_length must be 1 to {limit} (the embedding format holds at most {limit} "
                     f"tokens), got {args.max_length}.")
    args.text_encoder = args.text_encoder or get_family(args.family).text_encoder
    return args


def read_captions(dataset: Path, prompt: str | None) -> dict[str, str]:
    """{image stem: caption}, from --prompt or metas/<stem>.txt; every problem is reported at once."""
    stems = [p.stem for p in list_images(dataset)]
    if prompt is not None:
        return {stem: prompt for stem in stems}
    metas = dataset / "metas"
    if not metas.is_dir():
        raise FileNotFoundError(f"{metas} does not exist: write one caption per image as metas/<image name>.txt, "
                                "or pass --prompt for one shared caption.")
    captions, problems = {}, []
    for stem in stems:
        path = metas / f"{stem}.txt"
        try:
            text = path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            problems.append(f"{path} (missing)")
            continue
        except (UnicodeDecodeError, OSError) as e:
            problems.append(f"{path} ({e.__class__.__name__})")
            continue
        if not text:
            problems.append(f"{path} (empty)")
        captions[stem] = text
    if problems:
        shown = ", ".join(problems[:5]) + (f" and {len(problems) - 5} more" if len(problems) > 5 else "")
        raise ValueError(f"{len(problems)} captions are missing or unreadable: {shown}. Write a UTF-8 caption per "
                         "image in metas/, or pass --prompt. Nothing was written.")
    return captions


def encoder_or_exit(args, text, device, dtype):
    """The family's encoder (a tuple whose last element is the model, compiled with --compile), or a clear exit
    naming the path."""
    try:
        encoder = text.load_encoder(args.text_encoder, device, dtype, args.load_in_8bit)
    except OSError as e:  # load_encoder's message names the path and the fix
        raise SystemExit(f"precompute_t5.py: {e} Nothing was written.")
    return (*encoder[:-1], torch.compile(encoder[-1], dynamic=True)) if args.compile else encoder


def precompute_hf(args, text, device, dtype) -> None:
    """Add the family's encodings as a column (t5_xxl: float16 (n_tokens, 1024); anima_text: safetensors bytes)
    and save_to_disk a copy."""
    from cosmos_t2i.data import load_hf_dataset

    column = text.COLUMN
    if not Path(args.dataset_name).exists() and not args.output_dataset:
        raise SystemExit("--dataset_name from the hub needs --output_dataset (a local folder to save to).")
    out = Path(args.output_dataset or f"{args.dataset_name.rstrip('/')}_{column.replace('_', '')}")
    if out.exists() and not args.overwrite:
        print(f"{out} exists: already encoded (pass --overwrite to redo)")
        return
    ds = load_hf_dataset(args.dataset_name, args.split)
    if args.prompt is None and args.caption_column not in ds.column_names:
        raise SystemExit(f"{args.dataset_name}: no caption column {args.caption_column!r} (columns: "
                         f"{ds.column_names}); pass --caption_column or --prompt. Nothing was written.")
    captions = [args.prompt] * len(ds) if args.prompt is not None else ds[args.caption_column]
    bad = [i for i, c in enumerate(captions) if not isinstance(c, str) or not c.strip()]
    if bad:
        raise SystemExit(f"{args.dataset_name}: {len(bad)} rows have no caption (rows {bad[:5]}). Nothing was "
                         "written.")
    encoder = encoder_or_exit(args, text, device, dtype)
    unique = sorted(set(captions))
    bar = tqdm(total=len(unique), desc=WORDS[args.family][0], unit="caption")
    too_long = []
    items = text.encode_captions(encoder, unique, args.max_length, args.batch_size, on_batch=bar.update,
                                 too_long=too_long)
    values = {caption: text.to_column(item) for caption, item in zip(unique, items)}
    bar.close()
    first_row = {c: i for i, c in reversed(list(enumerate(captions)))}
    report_long_captions([(f"row {first_row[unique[i]]}", n) for i, n in too_long], len(unique), args.max_length,
                         who=WORDS[args.family][1])
    features = ds.features.copy()
    features[column] = text.column_feature()
    ds = ds.map(lambda batch, idx: {column: [values[captions[i]] for i in idx]}, with_indices=True,
                batched=True, features=features, desc=f"adding {column}")
    tmp = out.with_name(f".{out.name}.tmp")
    ds.save_to_disk(str(tmp))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {len(ds)} rows with a {column} column to {out}")


def report_long_captions(too_long: list[tuple[str, int]], total: int, max_length: int, shown: int = 5,
                         who: str = "NVIDIA's encoder") -> None:
    """One summary, after the progress bar, of the captions cut at the token limit (a warning per caption was
    drawn over by the bar and easy to miss)."""
    if not too_long:
        return
    names = list(dict.fromkeys(f"{name} ({n} tokens)" for name, n in too_long))  # --prompt: one name for all
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    print(f"{len(too_long)} of {total} captions are over the {max_length}-token limit: {listed}. Their embeddings "
          f"hold the first {max_length} tokens of each and the rest was dropped, as {who} does; shorten "
          "those captions if their ends matter.")


def is_valid_embedding(text, path) -> bool:
    """Done already: the file exists and reads as a well-formed, finite encoding (else it is encoded again)."""
    if not path.exists():
        return False
    try:
        text.read_text(path)
        return True
    except ValueError:
        return False


def main(argv=None):
    from cosmos_t2i.models import quiet_library_logs

    args = parse_args(argv)
    quiet_library_logs()  # after parsing: a flag error needs no library imported
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState()
    text = get_family(args.family).text
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if state.device.type == "cuda" else torch.float32)
    if args.dataset_name:
        if state.is_main_process:  # one process: the copy is written once
            precompute_hf(args, text, state.device, dtype)
        return
    dataset = Path(args.dataset_path)
    captions = read_captions(dataset, args.prompt)
    out_dir = dataset / text.FOLDER
    todo = [s for s in sorted(captions)
            if args.overwrite or not is_valid_embedding(text, out_dir / f"{s}{text.SUFFIX}")]
    skipped = len(captions) - len(todo)
    if state.is_main_process:
        print(f"{dataset}: {len(captions)} captions, {skipped} already encoded, {len(todo)} to encode")
    if not todo:
        return
    mine = todo[state.process_index::state.num_processes]
    encoder = encoder_or_exit(args, text, state.device, dtype)
    out_dir.mkdir(exist_ok=True)
    bar = tqdm(total=len(mine), desc=WORDS[args.family][0], unit="caption", disable=not state.is_local_main_process)
    start = time.perf_counter()
    # Encode and write in chunks, so an interrupted run keeps what it finished.
    chunk = max(args.batch_size * 8, 256)
    too_long = []
    for i in range(0, len(mine), chunk):
        stems, cut = mine[i:i + chunk], []
        items = text.encode_captions(encoder, [captions[s] for s in stems], args.max_length, args.batch_size,
                                     on_batch=bar.update, too_long=cut)
        too_long += [(f"metas/{stems[j]}.txt" if args.prompt is None else "--prompt", n) for j, n in cut]
        for stem, item in zip(stems, items):
            text.write_text(out_dir / f"{stem}{text.SUFFIX}", item)
        bar.set_postfix(captions_per_s=f"{(i + len(stems)) / (time.perf_counter() - start):.1f}")
    bar.close()
    too_long = gather_object(too_long)  # every process's, in one summary
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"wrote {len(todo)} embeddings to {out_dir}")
        report_long_captions(too_long, len(todo), args.max_length, who=WORDS[args.family][1])


if __name__ == "__main__":
    run_main(main, "precompute_t5.py")
