"""A run folder handed to us (a shared disk, a downloaded checkpoint) cannot run code; start-up never deletes a usable
checkpoint; a save that cannot be written (a full disk) loses nothing that was complete."""

import os
import pickle
import resource
import shutil
import subprocess
import sys

from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from conftest import ROOT, run_script, tiny_args

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import run_folder
from cosmos_t2i import shards
from cosmos_t2i.saving import check_disk_space


def run_dir(out):
    return ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")


@pytest.fixture(scope="module")
def saved_run(tiny_bundle, tmp_path_factory):
    """A finished run with checkpoints at iterations 3 and 6; tests copy it (the `copy_of_run` fixture)."""
    out = tmp_path_factory.mktemp("saved") / "ck"
    run_script(*tiny_args(tiny_bundle, out, "--max_iter", "6", "--save_iter", "3"))
    return out


@pytest.fixture
def copy_of_run(saved_run, tmp_path):
    return Path(shutil.copytree(saved_run, tmp_path / "ck"))


class Payload:
    """Unpickling this creates `marker`: proof that a file ran code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_crafted_metadata_is_refused_at_resume_without_running(tiny_bundle, copy_of_run, tmp_path):
    out, marker = copy_of_run, tmp_path / "payload_ran"
    metadata = ckpt.shards_dir(run_dir(out), 6) / ".metadata"
    metadata.write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(shards.UnsafeCheckpointError):  # export and inference read it through the same function
        shards.read_metadata(metadata.parent)
    result = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "7", "--save_iter", "3"))
    assert not marker.exists()
    assert f"{metadata}: refused to unpickle posix.mkdir" in result.stderr
    assert "at iteration 3" in result.stderr  # fell back to the checkpoint before


def test_pickled_byte_entries_of_a_shard_file_are_refused(tmp_path):
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, MetadataIndex

    import io

    folder, marker = tmp_path / "shards", tmp_path / "payload_ran"
    folder.mkdir()
    buffer = io.BytesIO()
    torch.save(Payload(marker), buffer)  # what DCP writes for a bytes entry, and unpickles on load
    data = buffer.getvalue()
    (folder / "__0_0.distcp").write_bytes(data)
    metadata = Metadata(state_dict_metadata={"model.w": BytesStorageMetadata()},
                        storage_data={MetadataIndex("model.w"): _StorageInfo("__0_0.distcp", 0, len(data))})
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(shards.UnsafeCheckpointError, match="stored as pickled bytes"):
        shards.load({"model": {"w": torch.zeros(3)}}, folder, no_dist=True)
    assert not marker.exists()
    # the folder is really dangerous: torch's own reader runs the payload
    dcp.load({"model": {"w": torch.zeros(3)}}, checkpoint_id=str(folder), no_dist=True)
    assert marker.exists()


def test_rollback_by_hand_keeps_newer_checkpoints(tiny_bundle, copy_of_run):
    out = copy_of_run
    d = run_dir(out)
    (d / "latest_checkpoint.txt").write_text("iter_000000003.pt")
    result = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "5", "--save_iter", "3", "--keep_last", "1"))
    assert "resumed from" in result.stderr and "at iteration 3" in result.stderr
    assert "newer complete checkpoints exist (6)" in result.stderr
    # 6 is kept (the run has not saved past it); --keep_last pruned 3 after 5 was saved
    assert ckpt.latest_iteration(d) == 5 and run_folder.checkpoint_problem(d, 6) is None
    assert not ckpt.model_file(d, 3).exists()

    # a pointer naming an iteration that is not there (lower than every checkpoint) falls back to the newest
    (d / "latest_checkpoint.txt").write_text("iter_000000001.pt")
    again = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "7", "--save_iter", "3"))
    assert "at iteration 6" in again.stderr and "iteration 1 cannot be used" in again.stderr
    assert run_folder.checkpoint_problem(d, 5) is None and ckpt.latest_iteration(d) == 7


def test_no_usable_checkpoint_stops_and_lists_them_unless_start_over(tiny_bundle, copy_of_run):
    out = copy_of_run
    d = run_dir(out)
    for i in (3, 6):
        (d / "trainer" / ckpt.iter_name(i)).write_bytes(b"damaged")
    result = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "8", "--save_iter", "2"), check=False)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "none of the 2 checkpoints can be resumed from" in result.stderr and "--start_over" in result.stderr
    assert "iteration 6:" in result.stderr and "iteration 3:" in result.stderr
    assert ckpt.model_file(d, 6).exists() and ckpt.model_file(d, 3).exists()  # nothing deleted
    over = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "2", "--save_iter", "2", "--start_over"))
    assert "resumed from" not in over.stderr and run_folder.checkpoint_problem(d, 2) is None


def test_resume_after_the_data_changed_says_how_the_position_maps(tiny_bundle, dataset_copy, tmp_path):
    out = tmp_path / "ck"
    args = tiny_args(tiny_bundle, out, "--max_iter", "2", "--save_iter", "2")
    args[args.index("--dataset_dir") + 1] = dataset_copy
    run_script(*args)
    for i, image in enumerate(sorted((dataset_copy / "images").iterdir())[:2]):  # 16 -> 18 samples
        shutil.copy(image, image.with_name(f"added{i}{image.suffix}"))
        shutil.copy(dataset_copy / "metas" / f"{image.stem}.txt", dataset_copy / "metas" / f"added{i}.txt")
        shutil.copy(dataset_copy / "t5_xxl" / f"{image.stem}.pickle", dataset_copy / "t5_xxl" / f"added{i}.pickle")
    args[args.index("--max_iter") + 1] = "3"
    result = run_script(*args)
    assert "the data changed since the checkpoint: 16 samples, 4 global batches per epoch then; 18, 4 now" \
        in result.stderr
    assert "goes on at global batch 2, which is now batch 2 of epoch 0" in result.stderr


def start_limited(args, file_size_limit=None, env=None):
    """The trainer through tests/run_patched.py, optionally with writes past `file_size_limit` bytes failing."""
    def limit():
        if file_size_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))
    return subprocess.run([sys.executable, "tests/run_patched.py", *map(str, args[1:])], cwd=ROOT,
                          capture_output=True, text=True, preexec_fn=limit, env=dict(os.environ, **(env or {})))


def test_a_shard_write_error_keeps_the_previous_checkpoint_and_the_last_save_exits_74(tiny_bundle, copy_of_run):
    """Writes past RLIMIT_FSIZE fail (EFBIG) as a full disk does (ENOSPC): the shard files (1.7 MB each) cannot be
    written, the small files can."""
    out = copy_of_run
    d = run_dir(out)
    result = start_limited(tiny_args(tiny_bundle, out, "--max_iter", "10", "--save_iter", "2"), 1_500_000)
    assert result.returncode == ckpt.SAVE_FAILED_EXIT_CODE, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "checkpoint iter_000000008.pt not saved" in result.stderr
    last = [line for line in result.stderr.splitlines() if line.strip() and not line.startswith("train:")][-1]
    assert "checkpoint iter_000000010.pt not saved" in last and "File too large" in last
    assert "iter_000000006.pt stays the latest" in last and "GB free" in last
    assert ckpt.latest_iteration(d) == 6 and run_folder.checkpoint_problem(d, 6) is None
    assert ckpt.saved_iterations(d) == [3, 6]  # the partial ones are gone
    assert (d.parent / "exit_code").read_text().strip() == str(ckpt.SAVE_FAILED_EXIT_CODE)


def test_a_model_file_write_error_is_reported_and_the_next_save_succeeds(tiny_bundle, tmp_path):
    out = tmp_path / "ck"
    result = start_limited(tiny_args(tiny_bundle, out, "--max_iter", "6", "--save_iter", "2"),
                           env={"COSMOS_TEST_MODEL_FILE_ENOSPC": "4"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint iter_000000004.pt not saved (OSError: [Errno 28] No space left on device)" in result.stderr
    assert "iter_000000002.pt stays the latest" in result.stderr
    d = run_dir(out)
    assert ckpt.latest_iteration(d) == 6 and ckpt.saved_iterations(d) == [2, 6]
    assert not list((d / "model").glob(".*tmp*"))


def test_disk_space_is_checked_before_training(tmp_path, monkeypatch, caplog):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 10 ** 9))
    with pytest.raises(SystemExit, match="one checkpoint needs about 12.00 GB but the disk holding it has 10.00 GB"):
        check_disk_space(tmp_path / "run" / "checkpoints", 12 * 10 ** 9, keep_last=2, saves_planned=5)
    check_disk_space(tmp_path / "run" / "checkpoints", 4 * 10 ** 9, keep_last=2, saves_planned=5)
    assert "room for 2 more checkpoints" in caplog.text and "--keep_last 2 + the one being written" in caplog.text
    caplog.clear()
    check_disk_space(tmp_path / "run" / "checkpoints", 4 * 10 ** 9, keep_last=1, saves_planned=5)
    assert not caplog.text
