"""Runs that survive schedulers and damage: signals, wall-time limits, a dead launcher, damaged checkpoints, and
two runs on one folder."""

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, losses_of, run_script, tiny_args

from cosmos_t2i import checkpoint as ckpt
from cosmos_t2i import run_folder
from cosmos_t2i.run_control import (EXIT_CODE_FILE, LOCK, STOPPED_EXIT_CODE, launcher_grace_s, parse_duration,
                                    stop_save_warning)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="POSIX signals and /proc")


LAUNCHERS = {"accelerate": ["-m", "accelerate.commands.launch", "--num_processes", "1", "--mixed_precision", "no",
                              "--dynamo_backend", "no"],
             "torchrun": ["-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", "29671"]}


def start(args, launcher=None, env=None):
    """The trainer in its own process group, output in files (no pipe to fill)."""
    log = open(args[args.index("--output_root") + 1] + ".log", "w")
    command = [sys.executable, *LAUNCHERS.get(launcher, []), *map(str, args)]
    return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))), log.name


def wait_for_iteration(log, n, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        found = losses_of(open(log).read())
        if found and max(found) >= n:
            return
        time.sleep(0.2)
    raise AssertionError(f"no iteration {n} in {log}:\n{open(log).read()[-3000:]}")


def run_dir(out):
    return ckpt.checkpoint_dir(out, "posttraining", "text2image", "t")


def test_sigterm_to_the_group_saves_where_it_stopped_and_resumes_exactly(tiny_bundle, tmp_path):
    straight = run_script(*tiny_args(tiny_bundle, tmp_path / "straight", "--max_iter", "400", "--save_iter", "100",
                                     "--max_iter", "60"))
    out = str(tmp_path / "ck")
    proc, log = start(tiny_args(tiny_bundle, out, "--max_iter", "400", "--save_iter", "100", "--num_workers", "2"))
    wait_for_iteration(log, 8)
    os.killpg(proc.pid, signal.SIGTERM)  # what SLURM and Kubernetes do before preemption
    assert proc.wait(timeout=120) == STOPPED_EXIT_CODE, open(log).read()[-3000:]
    text = open(log).read()
    stopped = ckpt.latest_iteration(run_dir(out))
    assert stopped is not None and stopped >= 8 and f"stopped (SIGTERM) at iteration {stopped}" in text
    assert (run_dir(out).parent / EXIT_CODE_FILE).read_text() == f"{STOPPED_EXIT_CODE}\n"
    assert run_folder.checkpoint_problem(run_dir(out), stopped) is None
    assert not (run_dir(out).parent / LOCK).exists()
    # a stop save writes only what a resume needs (it must fit the launcher's grace); the next start builds the rest
    assert not ckpt.model_file(run_dir(out), stopped).exists()
    resumed = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "400", "--save_iter", "100", "--max_iter",
                                    str(stopped + 3)))
    assert torch.load(ckpt.model_file(run_dir(out), stopped), weights_only=True)
    a, b = losses_of(straight.stderr), losses_of(resumed.stderr)
    assert [a[i] for i in range(stopped + 1, stopped + 4)] == [b[i] for i in range(stopped + 1, stopped + 4)]


def test_a_run_whose_data_breaks_mid_way_saves_names_the_file_and_exits(tiny_bundle, dataset_copy, tmp_path):
    """An image that becomes unreadable mid-run (loader workers, which ignore SIGTERM, read it): the run saves the
    iteration before, names the file in one line and exits with 65; before, it exited with 1 and lost every
    iteration since the last save."""
    from cosmos_t2i.saving import DATA_ERROR_EXIT_CODE

    out = str(tmp_path / "ck")
    args = tiny_args(tiny_bundle, out, "--max_iter", "100000", "--save_iter", "100000", "--no-final_save",
                     "--num_workers", "2")
    args[args.index("--dataset_dir") + 1] = dataset_copy
    proc, log = start(args)
    wait_for_iteration(log, 3)
    for image in (dataset_copy / "images").iterdir():  # every image now fails to decode
        image.write_bytes(image.read_bytes()[:100])
    try:
        code = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"the run did not exit after its error:\n{open(log).read()[-3000:]}")
    text = open(log).read()
    assert code == DATA_ERROR_EXIT_CODE and "cannot decode image" in text and "Traceback" not in text, text[-3000:]
    saved = ckpt.latest_iteration(run_dir(out))
    assert saved is not None and saved >= 3 and run_folder.checkpoint_problem(run_dir(out), saved) is None
    assert f"The checkpoint of iteration {saved} is in" in text


def test_a_stop_after_a_failed_background_save_still_saves(tiny_bundle, tmp_path):
    """The background save of 20 fails (a full disk: its model file), training goes on; a SIGTERM before the next
    save finds that failure when its own save waits for the one before, says it, and still writes the stop save
    (before, it exited 74 without trying)."""
    out = str(tmp_path / "ck")
    args = tiny_args(tiny_bundle, out, "--max_iter", "400", "--save_iter", "20")
    args[0] = "tests/run_patched.py"
    proc, log = start(args, env={"COSMOS_TEST_MODEL_FILE_ENOSPC": "20"})
    wait_for_iteration(log, 23)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == STOPPED_EXIT_CODE, open(log).read()[-3000:]
    text = open(log).read()
    stopped = ckpt.latest_iteration(run_dir(out))
    assert "checkpoint iter_000000020.pt not saved" in text and f"stopped (SIGTERM) at iteration {stopped}" in text
    assert 23 <= stopped < 40 and run_folder.checkpoint_problem(run_dir(out), stopped) is None
    assert ckpt.saved_iterations(run_dir(out)) == [stopped]


def test_second_signal_aborts_and_keeps_the_previous_checkpoint(tiny_bundle, tmp_path):
    out = str(tmp_path / "ck")
    proc, log = start(tiny_args(tiny_bundle, out, "--max_iter", "400", "--save_iter", "4"))
    wait_for_iteration(log, 6)
    deadline = time.time() + 60  # the save of iteration 4 runs in the background: on a loaded machine it may lag
    while ckpt.latest_iteration(run_dir(out)) is None and time.time() < deadline:
        time.sleep(0.05)
    before = ckpt.latest_iteration(run_dir(out))
    assert before is not None, open(log).read()[-2000:]
    os.killpg(proc.pid, signal.SIGINT)
    deadline = time.time() + 30
    while "SIGINT received" not in open(log).read() and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGINT)  # while the stop save is being written
    assert proc.wait(timeout=60) == 128 + signal.SIGINT, open(log).read()[-2000:]
    assert "SIGINT again: aborting now" in open(log).read()
    after = ckpt.latest_iteration(run_dir(out))
    assert after is not None and after >= before and run_folder.checkpoint_problem(run_dir(out), after) is None


def accelerate_versions():
    """The installed accelerate, and an older one where CI put it (COSMOS_TEST_ACCELERATE_DIRS: folders made by
    `pip install --target DIR accelerate==X`, separated by ':'): each launcher release changes how it stops."""
    return [None, *filter(None, os.environ.get("COSMOS_TEST_ACCELERATE_DIRS", "").split(":"))]


@pytest.mark.parametrize("launcher,accelerate_dir", [
    pytest.param("accelerate", d, id=f"accelerate-{os.path.basename(d) if d else 'installed'}")
    for d in accelerate_versions()] + [pytest.param("torchrun", None, id="torchrun")])
def test_trainer_stops_and_saves_when_its_launcher_dies(tiny_bundle, tmp_path, launcher, accelerate_dir):
    """accelerate launch >= 1.16 pipes the trainer's stderr through itself: once it is killed, the trainer's next
    log line went to a closed pipe and ended it (exit 1, no save). It must stop with a checkpoint, and say so in the
    run's own log file, the only place left to read."""
    out = str(tmp_path / "ck")
    env = {"PYTHONPATH": os.pathsep.join([accelerate_dir, os.environ.get("PYTHONPATH", "")])} if accelerate_dir else {}
    launcher_proc, log = start(tiny_args(tiny_bundle, out, "--max_iter", "400", "--save_iter", "100"),
                               launcher=launcher, env=env)
    wait_for_iteration(log, 4)
    trainer = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == launcher_proc.pid]
    assert trainer
    launcher_proc.send_signal(signal.SIGKILL)  # the launcher alone, as when its own job step is killed
    launcher_proc.wait()
    deadline = time.time() + 120
    while time.time() < deadline and any(os.path.exists(f"/proc/{p}") and _parent(p) is not None for p in trainer):
        time.sleep(0.5)
    assert not any(os.path.exists(f"/proc/{p}") and _parent(p) is not None for p in trainer), "trainer orphaned"
    run_log = (run_dir(out).parent / "train.log").read_text()
    assert "stopped (SIGTERM)" in run_log, run_log[-3000:]
    assert ckpt.latest_iteration(run_dir(out)) >= 4
    assert (run_dir(out).parent / EXIT_CODE_FILE).read_text().strip() == str(STOPPED_EXIT_CODE)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without GPUs")
def test_processes_that_do_not_form_one_job_are_told_so(tiny_bundle, tmp_path):
    """accelerate launch --multi_gpu on a machine without GPUs starts processes that each believe they are rank 0 of
    1; the second was refused as 'in use by another training run'."""
    result = subprocess.run([sys.executable, *LAUNCHERS["accelerate"][:2], "-q", "--multi_gpu", "--num_processes", "2",
                             "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29673",
                             *map(str, tiny_args(tiny_bundle, tmp_path / "ck", "--max_iter", "2"))],
                            cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert result.returncode != 0
    assert result.stderr.count("did not form one job") == 1 and "ACCELERATE_USE_CPU=true" in result.stderr
    assert "in use by another training run" not in result.stderr


def test_sighup_from_a_closed_terminal_stops_with_a_checkpoint(tiny_bundle, tmp_path):
    """A closed terminal or SSH session sends SIGHUP and takes the terminal away: a stop request, not a death."""
    out = str(tmp_path / "ck")
    proc, log = start(tiny_args(tiny_bundle, out, "--max_iter", "400", "--save_iter", "100"))
    wait_for_iteration(log, 3)
    os.killpg(proc.pid, signal.SIGHUP)
    assert proc.wait(timeout=120) == STOPPED_EXIT_CODE, open(log).read()[-3000:]
    assert "SIGHUP received" in (run_dir(out).parent / "train.log").read_text()
    stopped = ckpt.latest_iteration(run_dir(out))
    assert run_folder.checkpoint_problem(run_dir(out), stopped) is None
    assert not (run_dir(out).parent / LOCK).exists()
    # inference and export from the run folder build the model file the stop save left out
    built = ckpt.resolve_model_file(run_dir(out).parent)
    assert built == ckpt.model_file(run_dir(out), stopped) and any(
        k.startswith("net_ema.") for k in torch.load(built, weights_only=True))


def test_preemption_of_a_multi_process_run_saves_despite_repeated_sigterms(tiny_bundle, tmp_path):
    """SIGTERM to the launcher and to every trainer at once, as SLURM does: the trainers also get the launcher's
    forwarded SIGTERM and the kernel's when it exits. They still stop together, save and exit with 75 (before, the
    second SIGTERM aborted them without a save)."""
    out = str(tmp_path / "ck")
    args = ["tests/run_patched.py", *tiny_args(tiny_bundle, out, "--max_iter", "900", "--save_iter", "1000",
                                               "--batch_size", "2", "--num_workers", "2")[1:]]
    log = open(out + ".log", "w")
    launcher = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
         "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29657", *map(str, args)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env=dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1", COSMOS_TEST_FSDP="1"))
    wait_for_iteration(log.name, 4)
    trainers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _parent(int(p)) == launcher.pid]
    assert len(trainers) == 2
    for pid in [launcher.pid, *trainers]:
        os.kill(pid, signal.SIGTERM)
    time.sleep(0.3)
    for pid in trainers:  # a second one for sure, whatever the launcher forwards and when
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        launcher.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(launcher.pid, signal.SIGKILL)
        raise
    deadline = time.time() + 60
    while time.time() < deadline and any(_parent(p) is not None for p in trainers):
        time.sleep(0.5)
    text = open(log.name).read()
    assert "aborting now" not in text and text.count("stopped (SIGTERM) at iteration") == 1, text[-3000:]
    stopped = ckpt.latest_iteration(run_dir(out))
    assert stopped is not None and stopped >= 4 and run_folder.checkpoint_problem(run_dir(out), stopped) is None
    # the launcher reports its workers' 75 as 1: the run folder says what happened
    assert (run_dir(out).parent / EXIT_CODE_FILE).read_text().strip() == str(STOPPED_EXIT_CODE)


def _parent(pid):
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else int(fields[1])


def test_max_wall_time_saves_and_exits_in_time(tiny_bundle, tmp_path):
    assert parse_duration("3h50m") == 13800 and parse_duration("90") == 90
    out = tmp_path / "ck"
    start_time = time.time()
    result = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "100000", "--save_iter", "100000",
                                   "--max_wall_time", "45s"), check=False)
    assert result.returncode == STOPPED_EXIT_CODE, result.stderr[-2000:]
    assert time.time() - start_time < 45 + 5  # the limit counts from the process's start
    assert "stopped (--max_wall_time)" in result.stdout + result.stderr
    assert ckpt.latest_iteration(run_dir(out)) > 0
    bad = run_script(*tiny_args(tiny_bundle, out, "--max_wall_time", "soon"), check=False)
    assert bad.returncode != 0 and "--max_wall_time" in bad.stderr


def test_damaged_newest_checkpoint_falls_back_and_leftovers_are_removed(tiny_bundle, tmp_path):
    out = tmp_path / "ck"
    run_script(*tiny_args(tiny_bundle, out, "--max_iter", "4", "--save_iter", "2"))
    d = run_dir(out)
    model = ckpt.model_file(d, 4)
    model.write_bytes(model.read_bytes()[: model.stat().st_size // 2])  # truncated, as a full disk leaves it
    leftover = d / "model" / ".iter_000000006.pt.tmp1234"
    leftover.write_bytes(b"partial")
    result = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "6", "--save_iter", "2"))
    assert f"{model} is unreadable" in result.stderr and "resumed from" in result.stderr
    assert "at iteration 2" in result.stderr and not leftover.exists()
    assert ckpt.latest_iteration(d) == 6 and run_folder.checkpoint_problem(d, 4) is None  # rewritten on the way

    # a pointer naming an iteration that is not there never reads as "already finished"
    (d / "latest_checkpoint.txt").write_text("iter_000000099.pt")
    again = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "8", "--save_iter", "2"))
    assert "already finished" not in again.stdout + again.stderr
    assert "iteration 99 cannot be used" in again.stderr and ckpt.latest_iteration(d) == 8


def test_second_run_on_the_same_folder_is_refused_and_stale_locks_taken_over(tiny_bundle, tmp_path):
    out = str(tmp_path / "ck")
    proc, log = start(tiny_args(tiny_bundle, out, "--max_iter", "400", "--save_iter", "100"))
    wait_for_iteration(log, 2)
    second = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "400"), check=False)
    assert second.returncode != 0 and "in use by another training run" in second.stderr
    assert f"pid {proc.pid}" in second.stderr
    os.killpg(proc.pid, signal.SIGKILL)  # dies holding the lock
    proc.wait()
    lock = run_dir(out).parent / LOCK
    assert lock.exists()
    third = run_script(*tiny_args(tiny_bundle, out, "--max_iter", "2", "--save_iter", "2"), check=False)
    assert third.returncode == 0 and "taking over" in third.stderr and not lock.exists()


def test_unwritable_output_is_refused_before_loading(tiny_bundle, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = run_script(*tiny_args(tiny_bundle, blocker / "runs", "--max_iter", "2"), check=False)
    assert result.returncode != 0 and "--output_root" in result.stderr and "Traceback" not in result.stderr
    assert "trainable parameters" not in result.stderr  # nothing was loaded
    torch.manual_seed(0)


def test_trainer_error_is_the_last_line_under_accelerate_launch(tiny_bundle, tmp_path):
    args = tiny_args(tiny_bundle, tmp_path / "ck", "--max_iter", "2")
    args[args.index("--vae_path") + 1] = tiny_bundle / "models" / "transformer"  # a mistake found after launch
    result = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "-q", "--num_processes", "1",
                             "--mixed_precision", "no", "--dynamo_backend", "no", *map(str, args)], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode != 0
    last = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert last.startswith("train_text2image.py failed: ValueError:") and "not a VAE" in last


def test_launcher_grace_period_is_read_and_a_slower_save_is_named(monkeypatch):
    """torchrun kills its workers a grace period after forwarding a stop signal (30 s unless
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT says otherwise, torch >= 2.12): a save slower than that gets a warning with the
    fix; without torchrun there is no grace period to fit."""
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert launcher_grace_s() is None and stop_save_warning(500.0, None) is None
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    assert launcher_grace_s() == 30
    assert stop_save_warning(29.0, 30.0) is None
    message = stop_save_warning(100.0, 30.0)
    assert "took 100 s" in message and "30 s after it forwards a stop signal" in message
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")
    if torch.torch_version.TorchVersion(torch.__version__) >= "2.12":
        assert launcher_grace_s() == 600 and "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300" in message
    else:
        assert launcher_grace_s() == 30 and "torch >= 2.12" in message


def test_lock_heartbeat_goes_on_without_training_steps(tmp_path, monkeypatch):
    """The run lock's heartbeat comes from a thread, so a long stretch without training steps (latent-cache
    encoding, compilation, a slow save) does not make the lock look abandoned to a run on another host."""
    from cosmos_t2i import run_control
    monkeypatch.setattr(run_control, "HEARTBEAT_S", 0.1)
    lock = run_control.acquire_lock(tmp_path / "run")
    os.utime(lock, (0, 0))  # as if the last beat were long ago
    assert run_control._is_stale(lock, ("another-host", "1"))
    stop = run_control.keep_lock_alive(lock)
    try:
        deadline = time.time() + 10
        while time.time() < deadline and run_control._is_stale(lock, ("another-host", "1")):
            time.sleep(0.05)
        assert not run_control._is_stale(lock, ("another-host", "1"))
    finally:
        stop.set()
