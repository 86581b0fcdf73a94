"""Anima's text side (cosmos_t2i/anima_text.py) and `precompute_t5.py --family anima`: the stored items are what
diffusers' Anima pipeline encodes, files resume and heal, long captions are reported, the Hugging Face column holds the
same items, and caption dropout and padding give the adapter exactly what the pipeline would."""

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import anima_args, losses_of, run_script

from cosmos_t2i import anima_text
from cosmos_t2i.anima import text_inputs

FIELDS = ("qwen_states", "qwen_mask", "t5_ids", "t5_mask")
CAPTIONS = ["a red circle on a blue background", "teal", "an image of a small sks robot, bright white and dark black "
            "with a large yellow triangle in the green background", "a yellow square", ""]


@pytest.fixture(scope="module")
def pipe(anima_bundle):
    """diffusers' Anima pipeline over the bundle's models, with its text components loaded."""
    from diffusers import ModularPipeline

    pipe = ModularPipeline.from_pretrained(str(anima_bundle / "models"))
    pipe.load_components(names=["text_encoder", "tokenizer", "t5_tokenizer"])
    return pipe


@pytest.fixture(scope="module")
def encoder(anima_bundle):
    return anima_text.load_encoder(anima_bundle / "models")


@pytest.fixture(scope="module")
def conditioner(anima_bundle):
    from diffusers import AnimaTextConditioner
    return AnimaTextConditioner.from_pretrained(anima_bundle / "models" / "text_conditioner").eval()


def reference(pipe, caption):
    """diffusers' encode_prompt of one caption, trimmed to its masks: (qwen states, T5 ids)."""
    from diffusers.modular_pipelines.anima.encoders import AnimaTextEncoderStep

    with torch.no_grad():
        out = AnimaTextEncoderStep.encode_prompt(pipe, caption, prepare_unconditional_embeds=False)
    qwen = out["qwen_prompt_embeds"][0][out["qwen_attention_mask"][0].bool()]
    return qwen, out["t5_input_ids"][0][out["t5_attention_mask"][0].bool()]


def assert_item_is(item, qwen, ids, atol=1e-5):
    assert item["qwen"].shape == qwen.shape and item["qwen"].dtype == torch.float32
    torch.testing.assert_close(item["qwen"], qwen, atol=atol, rtol=0)
    assert item["t5_ids"].dtype == torch.int32 and item["t5_ids"].tolist() == ids.tolist()
    assert item["t5_ids"][-1] == anima_text.T5_EOS


def batch_of(items):
    fields = [anima_text.sample_fields(item) for item in items]
    return {k: torch.stack([f[k] for f in fields]) for k in FIELDS}


def adapter(conditioner, **inputs):
    with torch.no_grad():
        return conditioner(**inputs)


def test_precomputed_items_equal_diffusers_encode_prompt(anima_bundle, pipe, encoder):
    dataset = anima_bundle / "dataset"
    files = sorted((dataset / "anima_text").iterdir())
    assert [f.name for f in files] == sorted(f"{p.stem}.safetensors" for p in (dataset / "images").iterdir())
    for path in files:
        item = anima_text.read_text(path)
        assert_item_is(item, *reference(pipe, (dataset / "metas" / f"{path.stem}.txt").read_text().strip()))
    # captions of different lengths (empty included), three to a batch: each as the pipeline encodes it alone
    items = anima_text.encode_captions(encoder, CAPTIONS, batch_size=3)
    lengths = [item["qwen"].shape[0] for item in items]
    assert lengths[4] == 0 and len(set(lengths)) == 5
    for caption, item in zip(CAPTIONS, items):
        assert_item_is(item, *reference(pipe, caption))


def test_precompute_resumes_and_heals_damaged_files(anima_bundle, tmp_path):
    dataset = shutil.copytree(anima_bundle / "dataset", tmp_path / "dataset")
    folder = dataset / "anima_text"
    truncated, poisoned, kept = sorted(folder.iterdir())[:3]
    originals = {p: anima_text.read_text(p) for p in (truncated, poisoned)}
    truncated.write_bytes(truncated.read_bytes()[:-20])
    item = dict(originals[poisoned], qwen=originals[poisoned]["qwen"].clone())
    item["qwen"][1, 2] = float("nan")
    anima_text.write_text(poisoned, item)
    # what training reads: an error naming the file and the fix
    for path, what in ((truncated, "unreadable"), (poisoned, "NaN or Inf")):
        with pytest.raises(ValueError, match=f"{path}: .*{what}.*precompute_t5.py --family anima"):
            anima_text.read_text(path)
    others = {p: p.stat().st_mtime_ns for p in folder.iterdir() if p not in originals}
    out = run_script("precompute_t5.py", "--family", "anima", "--dataset_path", dataset, "--text_encoder",
                     anima_bundle / "models").stdout
    assert "16 captions, 14 already encoded, 2 to encode" in out and f"wrote 2 embeddings to {folder}" in out
    for path, original in originals.items():
        again = anima_text.read_text(path)
        torch.testing.assert_close(again["qwen"], original["qwen"], atol=1e-5, rtol=0)
        assert torch.equal(again["t5_ids"], original["t5_ids"])
    assert all(p.stat().st_mtime_ns == t for p, t in others.items()) and kept in others
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_reading_refuses_what_is_not_an_anima_encoding(tmp_path):
    import pickle

    from safetensors.torch import save_file

    good = {"qwen": torch.zeros(3, 8), "t5_ids": torch.tensor([5, 6, 1], dtype=torch.int32)}
    cases = {"pickle.safetensors": (None, "unreadable"),
             "nometa.safetensors": (dict(good), "not an Anima text encoding"),
             "extra.safetensors": ({**good, "other": torch.zeros(1)}, "not an Anima text encoding"),
             "ids.safetensors": ({**good, "t5_ids": torch.zeros(0, dtype=torch.int32)}, "'t5_ids' must be"),
             "float_ids.safetensors": ({**good, "t5_ids": torch.ones(3)}, "'t5_ids' must be"),
             "negative.safetensors": ({**good, "t5_ids": torch.tensor([-1, 1])}, "outside"),
             "qwen1d.safetensors": ({**good, "qwen": torch.zeros(8)}, "'qwen' must be"),
             "long.safetensors": ({**good, "qwen": torch.zeros(513, 8)}, "'qwen' must be")}
    for name, (tensors, message) in cases.items():
        path = tmp_path / name
        if tensors is None:
            path.write_bytes(pickle.dumps(good))
        elif name == "nometa.safetensors":
            save_file(tensors, str(path))
        else:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path),
                      metadata={"format": anima_text.FORMAT})
        with pytest.raises(ValueError, match=f"{path}: .*{message}"):
            anima_text.read_text(path)
    with pytest.raises(ValueError, match="missing.safetensors: unreadable"):
        anima_text.read_text(tmp_path / "missing.safetensors")
    # the empty caption's item (no Qwen token) round-trips, in every allowed dtype
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        item = {"qwen": torch.zeros(0, 8, dtype=dtype), "t5_ids": torch.tensor([1], dtype=torch.int32)}
        anima_text.write_text(tmp_path / "empty.safetensors", item)
        back = anima_text.read_text(tmp_path / "empty.safetensors")
        assert back["qwen"].shape == (0, 8) and back["qwen"].dtype == dtype and back["t5_ids"].tolist() == [1]
        assert anima_text.from_column(anima_text.to_column(item), "row 0")["qwen"].dtype == dtype


def test_loading_errors_name_the_path(tmp_path):
    (tmp_path / "text_encoder").mkdir()
    for path, what in ((tmp_path / "nothing", "no Anima text encoder here"),
                       (tmp_path, "missing tokenizer/, t5_tokenizer/, text_encoder/config.json")):
        with pytest.raises(OSError, match=f"{path}.*{what}"):
            anima_text.load_encoder(path)


def test_long_captions_are_cut_and_reported(anima_bundle, encoder, tmp_path, caplog):
    dataset = shutil.copytree(anima_bundle / "dataset", tmp_path / "dataset")
    stem = sorted(p.stem for p in (dataset / "metas").iterdir())[0]
    (dataset / "metas" / f"{stem}.txt").write_text("a red circle on a blue background " * 4)
    (dataset / "anima_text" / f"{stem}.safetensors").unlink()
    result = run_script("precompute_t5.py", "--family", "anima", "--dataset_path", dataset, "--text_encoder",
                        anima_bundle / "models", "--max_length", "16")
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.startswith(f"1 of 1 captions are over the 16-token limit: metas/{stem}.txt (29 tokens). ")
    assert "diffusers' Anima pipeline" in summary
    item = anima_text.read_text(dataset / "anima_text" / f"{stem}.safetensors")
    assert item["qwen"].shape[0] == 16 and len(item["t5_ids"]) == 16 and item["t5_ids"][-1] == anima_text.T5_EOS
    # in-process: listed when asked, else a warning (never silent)
    too_long = []
    anima_text.encode_captions(encoder, ["teal", "a red circle " * 10], max_length=16, too_long=too_long)
    assert too_long == [(1, 31)]
    with caplog.at_level(logging.WARNING, logger="cosmos_t2i.anima_text"):
        anima_text.encode_captions(encoder, ["a red circle " * 10], max_length=16)
    assert "caption of 31 tokens" in caplog.text


def test_hf_dataset_column_holds_the_folder_items(anima_bundle, tmp_path):
    import datasets

    dataset = anima_bundle / "dataset"
    folder = tmp_path / "imagefolder"
    shutil.copytree(dataset / "images", folder)
    rows = [{"file_name": p.name, "text": (dataset / "metas" / f"{p.stem}.txt").read_text().strip()}
            for p in sorted(folder.iterdir())]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    result = run_script("precompute_t5.py", "--family", "anima", "--dataset_name", folder, "--text_encoder",
                        anima_bundle / "models")
    out = tmp_path / "imagefolder_animatext"
    assert f"wrote 16 rows with a anima_text column to {out}" in result.stdout
    ds = datasets.load_from_disk(str(out))
    assert ds.features[anima_text.COLUMN] == anima_text.column_feature()
    for i, row in enumerate(rows):
        item = anima_text.from_column(ds[i][anima_text.COLUMN], f"{out} row {i}")
        stem = os.path.splitext(row["file_name"])[0]
        expected = anima_text.read_text(dataset / "anima_text" / f"{stem}.safetensors")
        torch.testing.assert_close(item["qwen"], expected["qwen"], atol=1e-5, rtol=0)
        assert torch.equal(item["t5_ids"], expected["t5_ids"])
    with pytest.raises(ValueError, match="row 3: unreadable Anima text encoding"):
        anima_text.from_column(b"not safetensors", "row 3")
    # and the trainer reads the column
    args = anima_args(anima_bundle, tmp_path / "run", "--max_iter", 2, "--save_iter", 2, "--no-ema")
    i = args.index("--dataset_dir")
    args[i:i + 2] = ["--dataset_name", out]
    trained = run_script(*args)
    assert sorted(losses_of(trained.stdout + trained.stderr)) == [1, 2]


def test_dropped_captions_are_the_pipelines_empty_caption(pipe, encoder, conditioner):
    from diffusers.modular_pipelines.anima.encoders import AnimaTextEncoderStep

    with torch.no_grad():
        empty = AnimaTextEncoderStep.encode_prompt(pipe, "", prepare_unconditional_embeds=False)
    expected = adapter(conditioner, source_hidden_states=empty["qwen_prompt_embeds"],
                       source_attention_mask=empty["qwen_attention_mask"], target_input_ids=empty["t5_input_ids"],
                       target_attention_mask=empty["t5_attention_mask"])[0]
    items = anima_text.encode_captions(encoder, CAPTIONS[:3])
    text = anima_text.model_inputs(batch_of(items), lambda t: t)
    kept = adapter(conditioner, **text)
    dropped = anima_text.drop_captions(text, torch.tensor([0.0, 1.0, 0.0]))
    out = adapter(conditioner, **dropped)
    for row in (0, 2):
        torch.testing.assert_close(out[row], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(out[1], kept[1], atol=0, rtol=0)
    assert not torch.allclose(kept[0], expected, atol=1e-3)  # the caption did matter
    # a placeholder sample is the empty caption too, as wide as the real ones
    placeholder = anima_text.placeholder_fields(like=anima_text.sample_fields(items[0]))
    assert placeholder["qwen_states"].shape == (512, 64)
    assert placeholder["t5_ids"][:2].tolist() == [anima_text.T5_EOS, 0] and placeholder["t5_mask"].sum() == 1
    alone = adapter(conditioner, **text_inputs(*(placeholder[k][None] for k in FIELDS)))
    torch.testing.assert_close(alone[0], expected, atol=1e-5, rtol=0)
    assert anima_text.placeholder_fields()["qwen_states"].shape == (512, 1024)
    # no host synchronisation: the same runs on tensors that hold no data (.item(), bool() or a boolean index fail)
    meta = {k: v.to("meta") for k, v in text.items()}
    assert anima_text.drop_captions(meta, torch.ones(3, device="meta"))["target_input_ids"].shape == (3, 512)


def test_padding_changes_nothing_the_adapter_computes(encoder, conditioner):
    items = anima_text.encode_captions(encoder, CAPTIONS[:4], batch_size=2)
    padded = adapter(conditioner, **anima_text.model_inputs(batch_of(items), lambda t: t))
    assert padded.shape == (4, 512, 1024)
    for row, item in enumerate(items):
        alone = adapter(conditioner, source_hidden_states=item["qwen"][None],
                        target_input_ids=item["t5_ids"][None].long())
        torch.testing.assert_close(padded[row], alone[0], atol=1e-5, rtol=0)
    # the sampling helper gives the same inputs as the training batch
    prompts = anima_text.prompt_inputs(encoder, CAPTIONS[:4], "cpu")
    torch.testing.assert_close(adapter(conditioner, **prompts), padded, atol=1e-5, rtol=0)
