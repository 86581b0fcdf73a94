"""Registry, dataset checks, embedding format and safety, precompute_t5.py, the tiny bundle."""

import logging
import pickle
import struct

import numpy as np
import pytest
import torch
from conftest import run_script

from cosmos_t2i import registry
from cosmos_t2i.data import ImageDataset, find_samples, resize_image
from cosmos_t2i.t5 import (UnsafePickleError, encode_prompts, load_text_encoder, read_embedding, safe_loads,
                           write_embedding)


# ---------------------------------------------------------------- registry
def test_registry_shapes_match_nvidia_parameter_counts():
    from diffusers import CosmosTransformer3DModel
    assert set(registry.MODEL_SIZES) == {"0.6B", "2B", "14B", "tiny"}
    for size in ("0.6B", "2B", "14B"):
        with torch.device("meta"):
            model = CosmosTransformer3DModel(**registry.transformer_config(size))
        assert sum(p.numel() for p in model.parameters()) == registry.MODEL_SIZES[size]["params"], size
        assert registry.size_of_config(registry.transformer_config(size)) == size


def test_model_size_disagreeing_with_folder_config_is_an_error():
    config = registry.transformer_config("2B")
    registry.check_size_matches("2B", config, "x")
    registry.check_size_matches(None, config, "x")  # the folder's config is authoritative
    with pytest.raises(ValueError, match="--model_size 2B"):
        registry.check_size_matches("14B", config, "folder/config.json")


def test_resolution_table_is_height_width():
    assert registry.image_size_for("1024", "16:9") == (768, 1360)
    assert registry.image_size_for("480", "9:16") == (768, 432)


# ---------------------------------------------------------------- dataset
def test_dataset_discovers_sorted_samples_any_extension_case(dataset_copy):
    (dataset_copy / "images" / "sample_000_0.jpg").rename(dataset_copy / "images" / "sample_000_0.JPEG")
    samples = find_samples(dataset_copy)
    assert len(samples) == 16
    assert [s["name"] for s in samples] == sorted(s["name"] for s in samples)
    ds = ImageDataset(dataset_copy, image_size=(32, 48))
    item = ds[0]
    assert item["images"].shape == (3, 32, 48) and -1 <= item["images"].min() and item["images"].max() <= 1
    assert item["t5_text_embeddings"].shape == (512, 1024) and item["t5_text_mask"].shape == (512,)
    n = int(item["t5_text_mask"].sum())
    assert item["t5_text_embeddings"][n:].abs().sum() == 0 and item["t5_text_embeddings"][:n].abs().sum() > 0
    assert item["padding_mask"].shape == (1, 32, 48) and item["padding_mask"].sum() == 0


def test_incomplete_samples_are_listed_in_one_error_or_skipped(dataset_copy, caplog):
    (dataset_copy / "metas" / "sample_001_0.txt").unlink()
    (dataset_copy / "t5_xxl" / "sample_002_1.pickle").unlink()
    write_embedding(dataset_copy / "t5_xxl" / "sample_003_0.pickle", np.zeros((4, 77), np.float16))
    with pytest.raises(ValueError) as err:
        find_samples(dataset_copy)
    message = str(err.value)
    assert "3 of 16" in message and "sample_001_0" in message and "sample_002_1" in message
    assert "sample_003_0" in message and "precompute_t5.py" in message
    with caplog.at_level(logging.WARNING):
        assert len(find_samples(dataset_copy, skip_incomplete=True)) == 13
    assert "skipping 3" in caplog.text


def test_corrupt_image_error_names_the_file(dataset_copy):
    (dataset_copy / "images" / "sample_004_1.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="sample_004_1.jpg: cannot decode image"):  # at start, not mid-training
        ImageDataset(dataset_copy, image_size=(32, 32))


def test_resize_modes():
    image = torch.zeros(3, 40, 80, dtype=torch.uint8)
    image[:, :, :10] = 255  # white left eighth
    stretched = resize_image(image, (32, 32), "resize")
    cropped = resize_image(image, (32, 32), "center_crop")
    assert stretched.shape == cropped.shape == (3, 32, 32)
    assert stretched[:, :, :2].min() > 0.9  # the white strip survives a plain resize
    assert cropped.max() < -0.9  # the centre crop (columns 20..60 scaled) holds none of it


# ---------------------------------------------------------------- embeddings
def _to_numpy1(blob: bytes) -> bytes:
    """Rewrite a numpy 2 pickle into the byte stream numpy 1.x writes (module `numpy.core`)."""
    if blob[1] < 4:
        return blob.replace(b"numpy._core", b"numpy.core")
    out = blob
    for name in (b"numpy._core.multiarray", b"numpy._core.numeric"):
        new = name.replace(b"numpy._core", b"numpy.core")
        out = out.replace(bytes([0x8C, len(name)]) + name, bytes([0x8C, len(new)]) + new)
    shrink = len(blob) - len(out)
    frame = struct.unpack("<Q", out[3:11])[0]
    return out[:3] + struct.pack("<Q", frame - shrink) + out[11:]


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("numpy1", [False, True])
def test_safe_unpickler_loads_every_numpy_array_form(protocol, numpy1):
    array = np.random.default_rng(0).standard_normal((7, 1024)).astype(np.float16)
    blob = pickle.dumps([array], protocol=protocol)
    if numpy1:
        blob = _to_numpy1(blob)
        assert b"numpy.core" in blob and b"numpy._core" not in blob
    loaded = safe_loads(blob)
    assert isinstance(loaded, list) and loaded[0].dtype == np.float16
    np.testing.assert_array_equal(loaded[0], array)


def test_safe_unpickler_refuses_code(tmp_path):
    target = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(target), "w"))

    path = tmp_path / "evil.pickle"
    path.write_bytes(pickle.dumps([Payload()], protocol=4))
    with pytest.raises(UnsafePickleError, match="evil.pickle"):
        read_embedding(path)
    assert not target.exists()


def test_embedding_file_is_nvidia_format_and_atomic(tmp_path):
    array = np.random.default_rng(1).standard_normal((5, 1024)).astype(np.float32)
    path = tmp_path / "x.pickle"
    write_embedding(path, array)
    raw = pickle.loads(path.read_bytes())  # what NVIDIA's loader does
    assert isinstance(raw, list) and len(raw) == 1 and raw[0].dtype == np.float16 and raw[0].shape == (5, 1024)
    assert path.read_bytes()[1] == 4  # protocol 4
    assert list(tmp_path.iterdir()) == [path]  # no temporary left behind
    np.testing.assert_array_equal(read_embedding(path), array.astype(np.float16))


def test_batched_encoding_equals_one_at_a_time(tiny_bundle):
    tokenizer, encoder = load_text_encoder(str(tiny_bundle / "models" / "text_encoder"))
    prompts = ["a red circle", "a yellow square on a green background with a small white triangle and a robot",
               "teal", "a blue background", "the large dark circle on the bright square"]
    batched = encode_prompts(tokenizer, encoder, prompts, batch_size=3)
    single = [encode_prompts(tokenizer, encoder, [p], batch_size=1)[0] for p in prompts]
    for b, s, p in zip(batched, single, prompts):
        assert b.shape == s.shape == (len(tokenizer(p)["input_ids"]), 1024) and b.dtype == np.float16
        np.testing.assert_allclose(b.astype(np.float32), s.astype(np.float32), atol=2e-3, rtol=1e-3)
    # padded to 512 as NVIDIA does, then trimmed: the same numbers
    tokens = tokenizer([prompts[1]], padding="max_length", max_length=512, return_tensors="pt")
    with torch.no_grad():
        full = encoder(**tokens).last_hidden_state[0, :batched[1].shape[0]].numpy()
    np.testing.assert_allclose(batched[1].astype(np.float32), full, atol=2e-3, rtol=1e-3)


def test_8bit_encoder_runs_on_cpu(tiny_bundle):
    pytest.importorskip("bitsandbytes")
    tokenizer, encoder = load_text_encoder(str(tiny_bundle / "models" / "text_encoder"), load_in_8bit=True)
    reference_tok, reference = load_text_encoder(str(tiny_bundle / "models" / "text_encoder"))
    out8 = encode_prompts(tokenizer, encoder, ["a red circle on a blue background"])[0].astype(np.float32)
    ref = encode_prompts(reference_tok, reference, ["a red circle on a blue background"])[0].astype(np.float32)
    assert out8.shape == ref.shape and np.isfinite(out8).all()
    assert np.corrcoef(out8.ravel(), ref.ravel())[0, 1] > 0.9


# ---------------------------------------------------------------- precompute_t5.py
def test_precompute_skips_existing_and_resumes(tiny_bundle, dataset_copy):
    encoder = tiny_bundle / "models" / "text_encoder"
    kept = dataset_copy / "t5_xxl" / "sample_000_0.pickle"
    kept_bytes = kept.read_bytes()
    for stem in ("sample_005_0", "sample_006_1"):
        (dataset_copy / "t5_xxl" / f"{stem}.pickle").unlink()
    out = run_script("precompute_t5.py", "--dataset_dir", dataset_copy, "--text_encoder", encoder).stdout
    assert "14 already encoded, 2 to encode" in out
    assert (dataset_copy / "t5_xxl" / "sample_005_0.pickle").exists()
    assert kept.read_bytes() == kept_bytes
    out = run_script("precompute_t5.py", "--dataset_path", dataset_copy, "--text_encoder", encoder,
                     "--prompt", "An image of sks teal robot.", "--overwrite").stdout
    assert "16 to encode" in out
    assert read_embedding(kept).shape[0] == 8  # 6 words, ".", </s>


def test_precompute_errors_write_nothing(tiny_bundle, dataset_copy):
    encoder = tiny_bundle / "models" / "text_encoder"
    import shutil
    shutil.rmtree(dataset_copy / "t5_xxl")
    (dataset_copy / "metas" / "sample_002_0.txt").write_text("   ")
    result = run_script("precompute_t5.py", "--dataset_path", dataset_copy, "--text_encoder", encoder, check=False)
    assert result.returncode != 0 and "sample_002_0.txt (empty)" in result.stderr
    shutil.rmtree(dataset_copy / "metas")
    result = run_script("precompute_t5.py", "--dataset_path", dataset_copy, "--text_encoder", encoder, check=False)
    assert result.returncode != 0 and "metas" in result.stderr and "--prompt" in result.stderr
    result = run_script("precompute_t5.py", "--dataset_path", dataset_copy, "--prompt", "x",
                        "--text_encoder", dataset_copy / "no_encoder_here", check=False)
    assert result.returncode != 0 and "no_encoder_here" in result.stderr
    assert not (dataset_copy / "t5_xxl").exists() or not any((dataset_copy / "t5_xxl").iterdir())


# ---------------------------------------------------------------- tiny bundle
def test_tiny_bundle_loads_with_from_pretrained_and_runs(tiny_bundle):
    from diffusers import AutoencoderKLWan, CosmosTransformer3DModel
    from transformers import AutoTokenizer, T5EncoderModel
    models = tiny_bundle / "models"
    transformer = CosmosTransformer3DModel.from_pretrained(models / "transformer")
    vae = AutoencoderKLWan.from_pretrained(models / "vae")
    T5EncoderModel.from_pretrained(models / "text_encoder")
    AutoTokenizer.from_pretrained(models / "tokenizer")
    assert registry.size_of_config(dict(transformer.config)) == "tiny"
    assert transformer.config.concat_padding_mask and transformer.config.text_embed_dim == 1024
    x = torch.randn(2, 16, 1, 8, 8)
    out = transformer(x, torch.tensor([0.3, 0.7]), torch.randn(2, 512, 1024), padding_mask=torch.zeros(1, 1, 64, 64))
    assert out.sample.shape == x.shape and torch.isfinite(out.sample).all()
    assert vae.encode(torch.randn(1, 3, 1, 64, 64)).latent_dist.mean.shape == (1, 16, 1, 8, 8)


def test_precompute_splits_files_across_processes(tiny_bundle, dataset_copy):
    import os
    import shutil
    import subprocess
    import sys
    from conftest import ROOT
    shutil.rmtree(dataset_copy / "t5_xxl")
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                             "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                             "--main_process_port", "29533", "precompute_t5.py", "--dataset_path", str(dataset_copy),
                             "--text_encoder", str(tiny_bundle / "models" / "text_encoder")],
                            cwd=ROOT, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    written = sorted(p.name for p in (dataset_copy / "t5_xxl").iterdir())
    assert written == sorted(p.name for p in (tiny_bundle / "dataset" / "t5_xxl").iterdir())
    for name in written:
        np.testing.assert_array_equal(read_embedding(dataset_copy / "t5_xxl" / name),
                                      read_embedding(tiny_bundle / "dataset" / "t5_xxl" / name))
