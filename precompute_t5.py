"""Pre-compute T5 embeddings for a dataset: metas/*.txt -> t5_xxl/*.pickle (NVIDIA's format).

    python precompute_t5.py --dataset_path datasets/custom_text2image_dataset/

Each pickle holds a list with one float16 array (n_tokens, 1024), trimmed to the caption's true token count
(</s> included), so files load both here and in NVIDIA's repository. Captions are sorted by length and batched,
so a batch pads only to its longest caption. Files already written and well-formed are skipped (a killed run resumes; unreadable or malformed
ones are encoded again) unless --overwrite re-encodes all. Under `accelerate launch` with several processes the files are split across processes.
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from cosmos_t2i.cli import one_line_errors, run_main
from cosmos_t2i.data import list_images
from cosmos_t2i.t5 import MAX_LENGTH, encode_prompts, load_text_encoder, read_embedding, write_embedding

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_path", "--dataset_dir", dest="dataset_path",
                        help="dataset folder holding images/ and metas/ (the seed's layout)")
    parser.add_argument("--dataset_name", help="instead: a Hugging Face dataset (save_to_disk folder, imagefolder "
                                               "or hub id); writes a copy with a t5_xxl column")
    parser.add_argument("--caption_column", default="text", help="caption column of --dataset_name")
    parser.add_argument("--split", default="train", help="split of --dataset_name")
    parser.add_argument("--output_dataset", help="where --dataset_name's copy goes (default: <name>_t5xxl)")
    parser.add_argument("--text_encoder", default="google-t5/t5-11b",
                        help="T5 encoder: hub id, folder with encoder+tokenizer, a diffusers folder with "
                             "text_encoder/ and tokenizer/, or that text_encoder/ folder")
    parser.add_argument("--max_length", type=int, default=MAX_LENGTH, help="token limit (NVIDIA: 512)")
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
    if not 1 <= args.max_length <= MAX_LENGTH:
        parser.error(f"--max_length must be 1 to {MAX_LENGTH} (the embedding format holds at most {MAX_LENGTH} "
                     f"tokens), got {args.max_length}.")
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


def encoder_or_exit(args, device, dtype):
    """(tokenizer, encoder), or a clear exit naming the path."""
    try:
        tokenizer, encoder = load_text_encoder(args.text_encoder, device, dtype, args.load_in_8bit)
    except OSError as e:  # load_text_encoder's message names the path and the fix
        raise SystemExit(f"precompute_t5.py: {e} Nothing was written.")
    return tokenizer, (torch.compile(encoder, dynamic=True) if args.compile else encoder)


def precompute_hf(args, device, dtype) -> None:
    """Add NVIDIA-format embeddings as a `t5_xxl` column (float16, (n_tokens, 1024)) and save_to_disk a copy."""
    import datasets

    from cosmos_t2i.data import EMBEDDING_COLUMN, load_hf_dataset

    if not Path(args.dataset_name).exists() and not args.output_dataset:
        raise SystemExit("--dataset_name from the hub needs --output_dataset (a local folder to save to).")
    out = Path(args.output_dataset or f"{args.dataset_name.rstrip('/')}_t5xxl")
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
    tokenizer, encoder = encoder_or_exit(args, device, dtype)
    unique = sorted(set(captions))
    bar = tqdm(total=len(unique), desc="T5", unit="caption")
    too_long = []
    arrays = dict(zip(unique, encode_prompts(tokenizer, encoder, unique, args.max_length, args.batch_size,
                                             on_batch=bar.update, too_long=too_long)))
    bar.close()
    first_row = {c: i for i, c in reversed(list(enumerate(captions)))}
    report_long_captions([(f"row {first_row[unique[i]]}", n) for i, n in too_long], len(unique), args.max_length)
    features = ds.features.copy()
    features[EMBEDDING_COLUMN] = datasets.Array2D(shape=(None, 1024), dtype="float16")
    ds = ds.map(lambda batch, idx: {EMBEDDING_COLUMN: [arrays[captions[i]] for i in idx]}, with_indices=True,
                batched=True, features=features, desc="adding t5_xxl")
    tmp = out.with_name(f".{out.name}.tmp")
    ds.save_to_disk(str(tmp))
    if out.exists():
        import shutil
        shutil.rmtree(out)
    tmp.rename(out)
    print(f"wrote {len(ds)} rows with a {EMBEDDING_COLUMN} column to {out}")


def report_long_captions(too_long: list[tuple[str, int]], total: int, max_length: int, shown: int = 5) -> None:
    """One summary, after the progress bar, of the captions cut at the token limit (a warning per caption was
    drawn over by the bar and easy to miss)."""
    if not too_long:
        return
    names = list(dict.fromkeys(f"{name} ({n} tokens)" for name, n in too_long))  # --prompt: one name for all
    listed = ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")
    print(f"{len(too_long)} of {total} captions are over the {max_length}-token limit: {listed}. Their embeddings "
          f"hold the first {max_length} tokens of each and the rest was dropped, as NVIDIA's encoder does; shorten "
          "those captions if their ends matter.")


def is_valid_embedding(path) -> bool:
    """Done already: the file exists and reads as a well-formed, finite embedding (else it is encoded again)."""
    if not path.exists():
        return False
    try:
        read_embedding(path)
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
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if state.device.type == "cuda" else torch.float32)
    if args.dataset_name:
        if state.is_main_process:  # one process: the copy is written once
            precompute_hf(args, state.device, dtype)
        return
    dataset = Path(args.dataset_path)
    captions = read_captions(dataset, args.prompt)
    out_dir = dataset / "t5_xxl"
    todo = [s for s in sorted(captions) if args.overwrite or not is_valid_embedding(out_dir / f"{s}.pickle")]
    skipped = len(captions) - len(todo)
    if state.is_main_process:
        print(f"{dataset}: {len(captions)} captions, {skipped} already encoded, {len(todo)} to encode")
    if not todo:
        return
    mine = todo[state.process_index::state.num_processes]
    tokenizer, encoder = encoder_or_exit(args, state.device, dtype)
    out_dir.mkdir(exist_ok=True)
    bar = tqdm(total=len(mine), desc="T5", unit="caption", disable=not state.is_local_main_process)
    start = time.perf_counter()
    # Encode and write in chunks, so an interrupted run keeps what it finished.
    chunk = max(args.batch_size * 8, 256)
    too_long = []
    for i in range(0, len(mine), chunk):
        stems, cut = mine[i:i + chunk], []
        arrays = encode_prompts(tokenizer, encoder, [captions[s] for s in stems], args.max_length,
                                args.batch_size, on_batch=bar.update, too_long=cut)
        too_long += [(f"metas/{stems[j]}.txt" if args.prompt is None else "--prompt", n) for j, n in cut]
        for stem, array in zip(stems, arrays):
            write_embedding(out_dir / f"{stem}.pickle", array)
        bar.set_postfix(captions_per_s=f"{(i + len(stems)) / (time.perf_counter() - start):.1f}")
    bar.close()
    too_long = gather_object(too_long)  # every process's, in one summary
    state.wait_for_everyone()
    if state.is_main_process:
        print(f"wrote {len(todo)} embeddings to {out_dir}")
        report_long_captions(too_long, len(todo), args.max_length)


if __name__ == "__main__":
    run_main(main, "precompute_t5.py")
