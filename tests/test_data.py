"""Aspect-ratio buckets, per-process splits, HF datasets, the latent cache, video frames."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import losses_of, run_script, tiny_args
from PIL import Image

from cosmos_t2i.data import (ImageDataset, ResumableBatchSampler, fit_image, global_batches, load_hf_dataset,
                             nearest_bucket)
from cosmos_t2i.flow import run_transformer


def test_nearest_bucket():
    assert nearest_bucket(1920, 1080, "1024") == "16:9"
    assert nearest_bucket(1080, 1920, "1024") == "9:16"
    assert nearest_bucket(640, 480, "480") == "4:3"
    assert nearest_bucket(500, 510, "720") == "1:1"
    assert nearest_bucket(3000, 1000, "512") == "16:9"  # beyond the table: the widest


def test_fit_pad_marks_padded_pixels_and_crop_keeps_aspect():
    image = torch.full((3, 50, 100), 200, dtype=torch.uint8)  # 2:1 landscape into a square
    padded, mask = fit_image(image, (64, 64), "pad")
    assert padded.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    assert mask[0, :, 0].tolist() == [1] * 16 + [0] * 32 + [1] * 16  # 32 rows of image, 16 padded above/below
    assert torch.allclose(padded[:, 20:40], torch.full_like(padded[:, 20:40], 200 / 255 * 2 - 1), atol=1e-3)
    cropped, crop_mask = fit_image(image, (64, 64), "center_crop")
    assert crop_mask.sum() == 0 and cropped.shape == (3, 64, 64)


def mixed_aspect_dataset(dataset_copy):
    """Reshape the tiny images: a third wide, a third tall, a third square."""
    for i, path in enumerate(sorted((dataset_copy / "images").iterdir())):
        size = [(128, 72), (72, 128), (96, 96)][i % 3]
        Image.open(path).resize(size).save(path)
    return dataset_copy


def test_buckets_group_images_by_aspect(dataset_copy):
    ds = ImageDataset(mixed_aspect_dataset(dataset_copy), resize_mode="pad", resolution="480")
    assert ds.histogram == {"16:9": 6, "1:1": 5, "9:16": 5}
    for group in ds.groups:
        assert len({ds.sizes[i] for i in group}) == 1
    sample = ds[ds.groups[0][0]]
    assert sample["images"].shape[1:] == sample["padding_mask"].shape[1:] == ds.sizes[ds.groups[0][0]]


def test_split_across_processes_has_no_repeats_and_resumes():
    groups = [list(range(0, 7)), list(range(7, 20)), list(range(20, 23))]
    batches = global_batches(groups, 4, seed=0, epoch=0)
    assert len(batches) == 1 + 3 + 0  # full global batches per bucket; tails dropped
    for batch in batches:
        assert len(batch) == 4 and any(set(batch) <= set(g) for g in groups)  # one bucket per batch
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    assert global_batches(groups, 4, 0, 1) != batches  # reshuffled per epoch
    # two processes of batch 2 see exactly the global batches, split in halves, in the same order
    ranks = [iter(ResumableBatchSampler(groups, 2, r, 2, seed=0)) for r in range(2)]
    single = iter(ResumableBatchSampler(groups, 4, 0, 1, seed=0))
    for _ in range(10):  # across the epoch boundary
        a, b = next(ranks[0]), next(ranks[1])
        assert a + b == next(single) and not set(a) & set(b)
    # resuming at step 6 continues the same order
    fresh = iter(ResumableBatchSampler(groups, 4, 0, 1, seed=0))
    expected = [next(fresh) for _ in range(9)][6:]
    resumed = iter(ResumableBatchSampler(groups, 4, 0, 1, seed=0, start_step=6))
    assert [next(resumed) for _ in range(3)] == expected


def test_per_sample_padding_masks_match_single_forwards(tiny_bundle):
    from diffusers import CosmosTransformer3DModel
    model = CosmosTransformer3DModel.from_pretrained(tiny_bundle / "models" / "transformer").eval()
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 1, 8, 8, generator=g), torch.randn(2, 512, 1024, generator=g)
    t = torch.tensor([0.4, 0.6])
    masks = torch.zeros(2, 1, 64, 64)
    masks[0, :, :16] = 1  # only the first sample is padded
    with torch.no_grad():
        batched = run_transformer(model, x, t, ctx, masks)
        singles = torch.cat([run_transformer(model, x[i:i + 1], t[i:i + 1], ctx[i:i + 1], masks[i:i + 1])
                             for i in range(2)])
        unmasked = run_transformer(model, x, t, ctx, torch.zeros(2, 1, 64, 64))
        broadcast = run_transformer(model, x, t, ctx, torch.zeros(1, 1, 64, 64))  # diffusers' own path
        padded_alike = run_transformer(model, x, t, ctx, masks[:1].repeat(2, 1, 1, 1))
        padded_broadcast = run_transformer(model, x, t, ctx, masks[:1])
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-5)
    # a mask per sample, all equal, gives what one mask for the batch gives (what the training step passes then)
    torch.testing.assert_close(unmasked, broadcast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded_alike, padded_broadcast, rtol=1e-5, atol=1e-5)
    assert (batched[0] - unmasked[0]).abs().max() > 1e-4  # the mask reached the model


def test_bucketed_training_resumes_exactly(tiny_bundle, dataset_copy, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "models").symlink_to(tiny_bundle / "models")
    shutil.move(str(mixed_aspect_dataset(dataset_copy)), bundle / "dataset")
    extra = ["--aspect_buckets", "--resolution", "480", "--resize_mode", "pad", "--save_iter", "2"]
    straight = run_script(*tiny_args(bundle, tmp_path / "a", *extra, "--max_iter", "4"))
    assert "aspect buckets (480, pad): 16:9 768x432: 6, 1:1 480x480: 5, 9:16 432x768: 5" in straight.stderr
    run_script(*tiny_args(bundle, tmp_path / "b", *extra, "--max_iter", "2"))
    resumed = run_script(*tiny_args(bundle, tmp_path / "b", *extra, "--max_iter", "4"))
    a, b = losses_of(straight.stderr), losses_of(resumed.stderr)
    assert [a[3], a[4]] == [b[3], b[4]]


def test_hf_dataset_precompute_and_training(tiny_bundle, tmp_path):
    folder = tmp_path / "imagefolder"
    shutil.copytree(tiny_bundle / "dataset" / "images", folder)
    rows = [{"file_name": p.name, "text": (tiny_bundle / "dataset" / "metas" / f"{p.stem}.txt").read_text().strip()}
            for p in sorted(folder.iterdir())]
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    encoder = tiny_bundle / "models" / "text_encoder"
    run_script("precompute_t5.py", "--dataset_name", folder, "--text_encoder", encoder)
    out = tmp_path / "imagefolder_t5xxl"
    ds = load_hf_dataset(str(out))
    assert "t5_xxl" in ds.column_names and len(ds) == 16
    from cosmos_t2i.t5 import read_embedding
    first = np.asarray(ds[0]["t5_xxl"], dtype=np.float16)
    stem = os.path.splitext(rows[0]["file_name"])[0]
    np.testing.assert_array_equal(first, read_embedding(tiny_bundle / "dataset" / "t5_xxl" / f"{stem}.pickle"))
    again = run_script("precompute_t5.py", "--dataset_name", folder, "--text_encoder", encoder)
    assert "already encoded" in again.stdout
    args = tiny_args(tiny_bundle, tmp_path / "ck", "--max_iter", "2", "--save_iter", "2")
    i = args.index("--dataset_dir")
    args[i:i + 2] = ["--dataset_name", out]
    result = run_script(*args)
    assert len(losses_of(result.stderr)) == 2


def test_latent_cache_matches_on_the_fly_and_invalidates(tiny_bundle, dataset_copy, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "models").symlink_to(tiny_bundle / "models")
    shutil.move(str(dataset_copy), bundle / "dataset")
    common = ["--max_iter", "3", "--save_iter", "3"]
    plain = run_script(*tiny_args(bundle, tmp_path / "a", *common))
    cached = run_script(*tiny_args(bundle, tmp_path / "b", *common, "--cache_latents"))
    assert "encoding 16 of 16 images into the latent cache" in cached.stderr
    assert losses_of(plain.stderr) == losses_of(cached.stderr)
    cache_root = bundle / "dataset" / "latents_cache"
    (key_dir,) = list(cache_root.iterdir())
    assert len(list(key_dir.glob("*.safetensors"))) == 16

    # a changed image is re-encoded, the rest reused
    image = bundle / "dataset" / "images" / "sample_003_1.jpg"
    Image.open(image).transpose(Image.FLIP_LEFT_RIGHT).save(image)
    rerun = run_script(*tiny_args(bundle, tmp_path / "c", *common, "--cache_latents"))
    assert "encoding 1 of 16 images" in rerun.stderr
    # another size or another VAE is another cache
    run_script(*tiny_args(bundle, tmp_path / "d", *common, "--cache_latents", "--image_size", "32", "32"))
    other_vae = tmp_path / "vae"
    shutil.copytree(tiny_bundle / "models" / "vae", other_vae)
    from diffusers import AutoencoderKLWan
    vae = AutoencoderKLWan.from_pretrained(other_vae)
    with torch.no_grad():
        for p in vae.parameters():
            p.mul_(1.01)
    vae.save_pretrained(other_vae)
    args = tiny_args(bundle, tmp_path / "e", *common, "--cache_latents")
    args[args.index("--vae_path") + 1] = other_vae
    assert "encoding 16 of 16" in run_script(*args).stderr
    assert len(list(cache_root.iterdir())) == 3


def test_extract_frames(tmp_path):
    av = pytest.importorskip("av")
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("a", "b"):
        with av.open(str(videos / f"{name}.mp4"), "w") as container:
            stream = container.add_stream("mpeg4", rate=30)
            stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
            for i in range(61):
                frame = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 4, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
    (videos / "a.txt").write_text("a teal robot\n")
    result = run_script("examples/extract_frames.py", "--input_dir", videos, "--output_dir", tmp_path / "ds",
                        "--stride", "30", check=False)
    assert result.returncode != 0 and "b.mp4: no caption" in result.stderr
    run_script("examples/extract_frames.py", "--input_dir", videos, "--output_dir", tmp_path / "ds",
               "--stride", "30", "--caption", "An image of sks teal robot.")
    images = sorted((tmp_path / "ds" / "images").iterdir())
    assert [p.name for p in images] == [f"{v}_{i:06d}.jpg" for v in "ab" for i in (0, 30, 60)]
    assert Image.open(images[0]).size == (64, 48)
    assert (tmp_path / "ds" / "metas" / "b_000030.txt").read_text().strip() == "An image of sks teal robot."


# ---------------------------------------------------------------- data checked before training starts
def test_unreadable_images_and_missing_captions_are_one_error_or_skipped(dataset_copy):
    images = sorted((dataset_copy / "images").iterdir())
    broken = images[0]
    broken.write_bytes(broken.read_bytes()[:200])  # a truncated file: the header reads, the pixels do not
    (dataset_copy / "metas" / f"{images[1].stem}.txt").unlink()
    with pytest.raises(ValueError) as error:
        ImageDataset(dataset_copy, (64, 64))
    message = str(error.value)
    assert f"{broken.name}: cannot decode image" in message and f"{images[1].name}: no caption" in message
    assert len(ImageDataset(dataset_copy, (64, 64), skip_incomplete=True)) == len(images) - 2
    # good images were decoded once and recorded by size and modification time; a repaired one is checked again
    checked = json.loads((dataset_copy / ".file_check.json").read_text())
    assert f"images/{images[2].name}" in checked and f"t5_xxl/{images[2].stem}.pickle" in checked
    assert f"images/{broken.name}" not in checked
    shutil.copy(images[2], broken)
    assert len(ImageDataset(dataset_copy, (64, 64), skip_incomplete=True)) == len(images) - 1


def test_dataset_check_reads_each_file_once(dataset_copy, monkeypatch):
    """Images are decoded and embeddings read once, at the first start; later starts (every resume, every process)
    trust the record of files unchanged since (size, modification time) and read nothing."""
    import cosmos_t2i.data as data
    import cosmos_t2i.t5 as t5
    ImageDataset(dataset_copy, (64, 64))

    def refuse(path, *args, **kwargs):
        raise AssertionError(f"{path} was read again")
    monkeypatch.setattr(data, "load_image", refuse)
    monkeypatch.setattr(t5, "read_embedding", refuse)  # the family's text side reads embeddings (t5.read_text)
    assert len(ImageDataset(dataset_copy, (64, 64))) == len(list((dataset_copy / "images").iterdir()))


def test_image_modes_sixteen_bit_exif_and_alpha(tmp_path):
    from cosmos_t2i.data import BACKGROUND, load_image
    grey = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)  # 0..61380 of 65535
    Image.fromarray(grey).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    decoded = load_image(tmp_path / "g16.png")[0].double()
    assert abs(decoded.mean().item() - (grey / 257).mean()) < 0.6 and decoded.max() < 255  # scaled, not white
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    clear.save(tmp_path / "clear.png")
    assert load_image(tmp_path / "clear.png")[:, 0, 0].tolist() == list(BACKGROUND)
    tall = Image.new("RGB", (20, 10), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 0, 10, 10))  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    tall.save(tmp_path / "rotated.jpg", exif=exif)
    shown = load_image(tmp_path / "rotated.jpg")
    assert shown.shape == (3, 20, 10) and shown[:, :8].float().mean() > 200 and shown[:, 12:].float().mean() < 50


def test_two_images_with_one_name_are_an_error(dataset_copy):
    first = sorted((dataset_copy / "images").iterdir())[0]
    Image.open(first).save(first.with_suffix(".png"))
    with pytest.raises(ValueError, match=f"{first.name} and {first.stem}.png|{first.stem}.png and {first.name}"):
        ImageDataset(dataset_copy, (64, 64))


def test_non_finite_embeddings_are_named_and_re_encoded(dataset_copy, tiny_bundle):
    import pickle
    target = sorted((dataset_copy / "t5_xxl").iterdir())[0]
    array = pickle.loads(target.read_bytes())[0].copy()
    array[3, 5] = np.nan
    target.write_bytes(pickle.dumps([array], protocol=4))
    with pytest.raises(ValueError, match=f"{target}: the embedding holds NaN or Inf"):
        ImageDataset(dataset_copy, (64, 64))
    # the hint works: precompute_t5.py without --overwrite encodes malformed files again, and only those
    others = {p: p.stat().st_mtime_ns for p in (dataset_copy / "t5_xxl").iterdir() if p != target}
    run_script("precompute_t5.py", "--dataset_path", dataset_copy, "--text_encoder",
               tiny_bundle / "models" / "text_encoder")
    assert np.isfinite(pickle.loads(target.read_bytes())[0]).all()
    assert all(p.stat().st_mtime_ns == t for p, t in others.items())
    ImageDataset(dataset_copy, (64, 64))


# ---------------------------------------------------------------- samples that go bad during training, odd images
def _path_of(ds, index):
    return ds.source.samples[index]["image"]


@pytest.mark.parametrize("skip", [True, False])
def test_sample_unreadable_mid_run_is_replaced_by_the_next_of_its_group(dataset_copy, caplog, skip):
    """A damaged image or embedding mid-run: the next readable sample of the group (wrapping) takes its place, so the
    batch stacks; "unreadable" is "" (skip_incomplete, one warning per file) or the error naming the file and fix."""
    from cosmos_t2i.training import collate
    ds = ImageDataset(dataset_copy, (32, 32), skip_incomplete=skip)
    group = ds.groups[0]
    first, second, last = group[0], group[1], group[-1]
    assert ds[first]["unreadable"] == ""
    expected = ds[second]
    _path_of(ds, first).write_bytes(b"not an image any more")
    for _ in range(2):
        sample = ds[first]
        assert sample["name"] == ds.source.name(second)
        torch.testing.assert_close(sample["images"], expected["images"])
    named = [r.getMessage() for r in caplog.records if _path_of(ds, first).name in r.getMessage()]
    if skip:
        assert sample["unreadable"] == ""
        assert len(named) == 1 and "cannot decode image" in named[0] and "Skipped" in named[0]
    else:
        assert sample["unreadable"].startswith(f"{_path_of(ds, first)}: cannot decode image (")
        assert sample["unreadable"].endswith("Replace or remove the file.") and "\n" not in sample["unreadable"]
        assert not named
    # the group's last sample, its embedding emptied, wraps around past the unreadable first to the second
    embedding = dataset_copy / "t5_xxl" / f"{ds.source.name(last)}.pickle"
    embedding.write_bytes(b"")
    wrapped = ds[last]
    assert wrapped["name"] == ds.source.name(second)
    if skip:
        assert wrapped["unreadable"] == ""
    else:
        assert wrapped["unreadable"].startswith(f"{embedding}: unreadable embedding")
    batch = collate([ds[i] for i in (first, second, group[2], last)])
    assert batch["images"].shape == (4, 3, 32, 32) and all(isinstance(u, str) for u in batch["unreadable"])
    assert [bool(u) for u in batch["unreadable"]] == [not skip, False, False, not skip]
    # nothing of the group reads: the sample's own error, raised when skipping, else carried by zeros of its shape
    for i in group:
        _path_of(ds, i).write_bytes(b"")
    if skip:
        with pytest.raises(ValueError, match=f"{_path_of(ds, group[2]).name}: cannot decode image"):
            ds[group[2]]
    else:
        placeholder = ds[group[2]]
        assert f"{_path_of(ds, group[2]).name}: cannot decode image" in placeholder["unreadable"]
        assert placeholder["images"].shape == (3, 32, 32) and not placeholder["images"].any()


def _fill_fake_cache(cache, ds):
    """Entries as LatentCache.fill writes them, the latents of sample i all equal to i (no VAE needed)."""
    from safetensors.torch import save
    cache.dir.mkdir(parents=True)
    for i in range(len(ds)):
        cache.path(i).write_bytes(save({"latents": torch.full((16, 1, 4, 4), float(i)),
                                        "padding_mask": torch.zeros(1, 32, 32)},
                                       metadata={"image_version": ds.source.version(i)}))


def test_latent_cache_entry_unreadable_mid_run_is_replaced(dataset_copy, tmp_path):
    """An entry that stops loading mid-run is replaced like an unreadable image, its file named."""
    from cosmos_t2i.latent_cache import LatentCache
    ds = ImageDataset(dataset_copy, (32, 32))
    cache = LatentCache(tmp_path / "cache", ds, None)
    _fill_fake_cache(cache, ds)
    ds.latent_cache = cache
    first, second = ds.groups[0][:2]
    assert ds[first]["latents"][0, 0, 0, 0] == first and ds[first]["unreadable"] == ""
    cache.path(first).write_bytes(os.urandom(64))
    sample = ds[first]
    assert sample["latents"][0, 0, 0, 0] == second and sample["name"] == ds.source.name(second)
    assert sample["unreadable"].startswith(f"{cache.path(first)}: cannot load the cached latents")
    assert sample["unreadable"].endswith("encoded again at the next start.")


def test_damaged_latent_cache_entries_are_stale_and_encoded_again(dataset_copy, tmp_path, caplog, monkeypatch):
    """At the start, an entry of random bytes or emptied is stale like a missing one, named once, never fatal."""
    import cosmos_t2i.latent_cache as latent_cache
    ds = ImageDataset(dataset_copy, (32, 32))
    cache = latent_cache.LatentCache(tmp_path / "cache", ds, None)
    _fill_fake_cache(cache, ds)
    assert cache.stale() == []
    cache.path(3).write_bytes(os.urandom(64))
    cache.path(5).write_bytes(b"")
    assert cache.stale() == [3, 5]
    for i in (3, 5):
        named = [r.getMessage() for r in caplog.records if str(cache.path(i)) in r.getMessage()]
        assert len(named) == 1 and "damaged latent cache entry" in named[0] and "encoded again" in named[0]
    monkeypatch.setattr(latent_cache, "encode_images", lambda vae, images: torch.zeros(len(images), 16, 1, 4, 4))
    cache.fill(cache.stale(), None, "cpu", show_progress=False)
    assert cache.stale() == []


def _detailed_image(width, height) -> Image.Image:
    """Gradients, a smooth ripple and hard-edged discs: content on which decoding reduced could go wrong."""
    from PIL import ImageDraw
    yy, xx = np.mgrid[0:height, 0:width]
    ripple = 128 + 100 * np.sin(xx / 37.0) * np.cos(yy / 23.0)
    image = Image.fromarray(np.stack([xx * 255 / width, yy * 255 / height, ripple], -1).clip(0, 255).astype(np.uint8))
    draw, rng = ImageDraw.Draw(image), np.random.default_rng(0)
    for _ in range(30):
        x, y, r = rng.integers(0, width), rng.integers(0, height), rng.integers(10, 120)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return image


@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_large_image_decoded_reduced_matches_a_full_decode(tmp_path, suffix):
    """JPEG's DCT scaling (draft) and Image.reduce, for each fit, against a full decode and the same fit.

    Tolerance: the two differ in how the fit's pixels average the source (a box or DCT prefilter, then an
    antialiased resize by 2x or more, against one resize: Pillow's thumbnail() and libvips use the same two steps)
    and by integer offsets taken at the reduced scale, a displacement under a quarter of an output pixel: on smooth
    content well under a level, on hard edges a fraction of the edge's contrast. Measured on this image: mean
    difference at most 2.8 levels of 255 and 99th percentile at most 23 (a centre crop of the PNG; the JPEG at most
    0.6 and 5); asserted: 4 and 32, with the reduction itself checked by the decoded size.
    """
    from cosmos_t2i.data import load_image
    path = tmp_path / f"large{suffix}"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait: the reduction is worked out for the shown orientation
    _detailed_image(1600, 1200).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    full = load_image(path)
    assert full.shape == (3, 1600, 1200)
    for mode in ("resize", "center_crop", "pad"):
        for size in ((48, 64), (64, 48)):
            reduced = load_image(path, None, size, mode)
            assert reduced.shape[1] <= 200 and reduced.shape[1] > reduced.shape[2]  # reduced 8x or more, portrait
            levels = (fit_image(reduced, size, mode)[0] - fit_image(full, size, mode)[0]).abs().flatten() * 127.5
            assert levels.mean() < 4 and levels.quantile(0.99) < 32, (mode, size, levels.mean(), levels.max())


def test_huge_image_is_decoded_reduced_and_named_once(dataset_copy, caplog):
    """A 12000x12000 (144 Mpx) JPEG: no PIL bomb warning, one warning of ours at start, decoded small every time."""
    import time
    import warnings
    from cosmos_t2i.data import load_image
    huge = sorted((dataset_copy / "images").iterdir())[0]
    Image.new("RGB", (12000, 12000), (200, 30, 40)).save(huge, quality=90)  # about 1 s
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        ds = ImageDataset(dataset_copy, (32, 32))
        start = time.perf_counter()
        samples = [ds[0] for _ in range(3)]
        seconds = (time.perf_counter() - start) / 3
    named = [r.getMessage() for r in caplog.records if huge.name in r.getMessage()]
    assert len(named) == 1 and "144000000 pixels (12000x12000)" in named[0] and "decoded reduced" in named[0]
    colour = torch.tensor([200, 30, 40]).view(3, 1, 1) / 127.5 - 1
    assert (samples[0]["images"] - colour).abs().max() < 3 / 127.5 and samples[0]["name"] == huge.stem
    assert max(load_image(huge, None, (32, 32)).shape) <= 4 * 32  # decoded at 2 to 4 times the fit, not 12000
    assert seconds < 0.5, seconds  # measured 0.01 s; a full decode and fit take several seconds


def test_images_over_pils_hard_limit_load_reduced(dataset_copy, monkeypatch, caplog):
    """Past twice PIL's limit, Image.open raises DecompressionBombError; the dataset opens them anyway (the limit
    lowered here so that the tiny 96x96 images are past it, the path a 180+ Mpx image takes) and restores it."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    first = sorted((dataset_copy / "images").iterdir())[0]
    with pytest.raises(Image.DecompressionBombError):
        Image.open(first)
    ds = ImageDataset(dataset_copy, (32, 32))
    assert ds[0]["images"].shape == (3, 32, 32) and ds[0]["unreadable"] == ""
    assert f"{first}: 9216 pixels (96x96), over PIL's decompression-bomb limit of 1000" in caplog.text
    assert Image.MAX_IMAGE_PIXELS == 1000


@pytest.mark.parametrize("mode", ["resize", "center_crop", "pad"])
def test_thin_images_fit_in_every_mode_and_are_named_at_start(dataset_copy, caplog, mode):
    """1x2000 and 2000x1 images: every mode fits them (a side that rounds to no pixel keeps one); a fit that keeps
    such a sliver is named in one warning when the dataset is built, not a crash at some later iteration."""
    for h, w in ((1, 2000), (2000, 1), (1, 1)):
        fitted, mask = fit_image(torch.full((3, h, w), 200, dtype=torch.uint8), (32, 48), mode)
        assert fitted.shape == (3, 32, 48) and torch.allclose(fitted, torch.tensor(200 / 127.5 - 1), atol=1e-4)
        if mode == "pad" and (h, w) != (1, 1):
            assert (mask == 0).sum() == (48 if h == 1 else 32)  # one row or column of image, the rest padding
    images = sorted((dataset_copy / "images").iterdir())
    Image.new("RGB", (2000, 1), (200, 30, 40)).save(images[1])
    ds = ImageDataset(dataset_copy, (32, 48), resize_mode=mode)
    assert ds[1]["images"].shape == (3, 32, 48)
    thin = [r.getMessage() for r in caplog.records if "too thin" in r.getMessage()]
    assert len(thin) == (mode == "pad") and (mode != "pad" or f"{images[1]} (2000x1)" in thin[0])


def test_bucket_of_an_exif_rotated_image_is_its_shown_aspect(dataset_copy):
    """Stored 128x72 with EXIF orientation 6, the image is shown (and decoded) 72x128: a portrait bucket."""
    first = sorted((dataset_copy / "images").iterdir())[0]
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.open(first).resize((128, 72)).save(first, exif=exif)
    ds = ImageDataset(dataset_copy, resize_mode="pad", resolution="480")
    assert ds.buckets[0] == "9:16" and ds[0]["padding_mask"].sum() < 0.05 * ds[0]["padding_mask"].numel()
