"""What a long run needs from its surroundings: a stop on request (signals, wall time, a dead launcher), one run
per folder, and a resume that says what changed.

A stop is agreed by every process at the same iteration: each process's request flag travels with the loss it
already reduces every step, so a signal to any of them stops all of them, and they save together.
"""

import ctypes
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)
STOPPED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again" - a stopped run that saved and can be resumed by rerunning
LOCK = ".run.lock"
LOCK_STALE_S = 15 * 60  # a lock whose heartbeat is older than this is left by a dead run, wherever it ran
EXIT_CODE_FILE = "exit_code"
TORCHRUN_GRACE_S = 30  # torchrun's default wait between forwarding a stop signal and killing its workers


def parse_duration(text: str) -> float:
    """'3h50m', '90m', '1h', '45s', '2d' or plain seconds -> seconds."""
    import re

    text = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)([dhms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration; write e.g. 3h50m, 90m or 5400.")
    return sum(float(n) * {"d": 86400, "h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)


class StopRequest:
    """Set by SIGTERM, SIGINT, SIGUSR1 or SIGHUP (a closed terminal or SSH session), and by the launcher's death; a
    second SIGINT or SIGUSR1 aborts at once.

    A repeated SIGTERM does not abort: under a launcher one preemption arrives as several (the scheduler signals
    every process, the launcher forwards its own, and the kernel sends one when the launcher exits), and aborting
    on the second lost the stop save of every multi-process run."""

    def __init__(self):
        self.reason, self.pid = None, os.getpid()
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._handle)
        if sys.platform.startswith("linux"):
            # the kernel sends us SIGTERM when the process that started us (accelerate launch) dies
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
            if os.getppid() == 1:  # the launcher died before we asked
                self.reason = "launcher gone"

    def _handle(self, signum, frame):
        if os.getpid() != self.pid:  # a forked helper process: the training process ends it after its save
            signal.signal(signum, signal.SIG_IGN)
            return
        name = signal.Signals(signum).name
        if self.reason is not None and signum in (signal.SIGTERM, signal.SIGHUP):
            sys.stderr.write(f"\n{name} again: already stopping ({self.reason}); the save goes on (SIGINT aborts).\n")
            return
        if self.reason is not None:
            sys.stderr.write(f"\n{name} again: aborting now; the last complete checkpoint stays the latest.\n")
            os._exit(128 + signum)
        self.reason = name
        sys.stderr.write(f"\n{name} received: saving a checkpoint at the end of this iteration, then exiting "
                         f"(a second SIGINT aborts without saving).\n")

    @property
    def requested(self) -> bool:
        return self.reason is not None


def ignore_stop_signals(_worker_id=None) -> None:
    """DataLoader worker_init_fn: workers leave stop signals to the training process, which ends them after its
    save (by default a worker dies on SIGTERM and takes the run down before it can save)."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


def end_workers_at_exit() -> None:
    """Kill the data loader's worker processes when the training process exits, before multiprocessing's own exit
    handler (atexit runs last-registered first), which ends children with SIGTERM and joins them: the workers ignore
    SIGTERM (ignore_stop_signals), so it waited forever; runs that failed mid-way and every multi-process run hung
    at their end. They only prefetch batches."""
    import atexit
    import multiprocessing

    def kill_workers():
        for child in multiprocessing.active_children():
            child.kill()
            child.join()
    atexit.register(kill_workers)


def record_exit_code(run_dir, code: int | None) -> None:
    """Write the trainers' exit code to <run_dir>/exit_code (0: finished, 75: stopped with a checkpoint, rerun to
    resume), or remove the file (None: a run in progress, or one that ended without saying).

    For job scripts: launchers report any non-zero exit of their workers as 1 (accelerate launch, torchrun), so
    behind one the 75 itself never reaches the script.
    """
    path = Path(run_dir) / EXIT_CODE_FILE
    if code is None:
        path.unlink(missing_ok=True)
        return
    from .checkpoint import atomic_write_text
    try:
        atomic_write_text(path, f"{code}\n")
    except OSError as e:  # the run itself is complete: its checkpoint is saved, so this is no reason to fail it
        logger.warning("could not write %s (%s): a job script reading it will see the launcher's exit code", path, e)


def _grace_is_settable() -> bool:
    """torchrun reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT from torch 2.12 on; before, its grace period is fixed."""
    import torch
    return torch.torch_version.TorchVersion(torch.__version__) >= "2.12"


def launcher_grace_s() -> float | None:
    """Seconds between torchrun forwarding a stop signal to its workers and killing them (also under accelerate
    launch, which runs torchrun), or None when this process was not started by it. torch >= 2.12 reads
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT (workers inherit the launcher's environment); before, 30 s is fixed."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    if not _grace_is_settable():
        return float(TORCHRUN_GRACE_S)
    value = os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", os.environ.get("PET_SHUTDOWN_TIMEOUT"))
    try:
        return float(value) if value is not None else float(TORCHRUN_GRACE_S)
    except ValueError:
        return float(TORCHRUN_GRACE_S)


ACCELERATE_SIMPLE_GRACE_S = 5  # accelerate launch >= 1.16, one process: SIGTERM to it kills the trainer 5 s later


def detect_launcher() -> tuple[str, float | None]:
    """(what started this process, seconds it leaves a trainer between a stop signal and a kill, or None: no limit
    known). torchrun (also behind accelerate launch with several processes), accelerate launch's own one-process
    launcher, SLURM and Kubernetes (30 s unless configured), or a plain start."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return "torchrun", launcher_grace_s()
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        parent = b""
    if b"accelerate" in parent:
        from importlib.metadata import version

        from torch.torch_version import TorchVersion
        if TorchVersion(version("accelerate")) >= "1.16":
            return f"accelerate launch {version('accelerate')} (one process)", float(ACCELERATE_SIMPLE_GRACE_S)
        return f"accelerate launch {version('accelerate')} (one process)", None
    if "SLURM_JOB_ID" in os.environ:
        return "SLURM (KillWait, 30 s by default)", 30.0
    if "KUBERNETES_SERVICE_HOST" in os.environ:
        return "Kubernetes (terminationGracePeriodSeconds, 30 s by default)", 30.0
    return "no launcher", None


def grace_advice(launcher: str) -> str:
    """How to give a stop save more time, or to bound what a kill loses, under `launcher`."""
    if launcher.startswith("accelerate"):
        return ("on one GPU start the script without a launcher (python train_text2image.py ...), or launch through "
                "torchrun --nproc_per_node 1 (its grace is 30 s, TORCH_ELASTIC_SHUTDOWN_TIMEOUT sets it); --save_interval "
                "30m bounds what a kill loses")
    if launcher.startswith("SLURM"):
        return ("ask for the signal ahead of the kill (#SBATCH --signal=USR1@300: SIGUSR1 stops with a checkpoint), and "
                "bound what a kill loses with --save_interval 30m")
    if launcher.startswith("Kubernetes"):
        return "raise terminationGracePeriodSeconds, and bound what a kill loses with --save_interval 30m"
    return "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=<seconds> before launching; --save_interval 30m bounds what a kill loses"


def check_one_job(accelerator) -> None:
    """Refuse processes that a launcher started together but that did not form one job (accelerate launch
    --multi_gpu on a machine without GPUs: each would believe it is rank 0 of 1 and train alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != accelerator.num_processes:
        if os.environ.get("RANK", "0") != "0":  # one of them says it
            raise SystemExit(1)
        raise SystemExit(f"the launcher started {world} processes but they did not form one job (this one sees "
                         f"{accelerator.num_processes}): Accelerate found no GPU for them. On CPUs set "
                         "ACCELERATE_USE_CPU=true (or pass --cpu to accelerate launch); on GPUs check "
                         "CUDA_VISIBLE_DEVICES and --num_processes.")


def stop_save_warning(save_s: float, grace_s: float | None, launcher: str = "torchrun") -> str | None:
    """What to tell the user when a save takes longer than the launcher waits after a stop signal, else None."""
    if grace_s is None or save_s <= grace_s:
        return None
    advice = (f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={max(60, int(3 * save_s))} before accelerate launch or torchrun"
              if launcher == "torchrun" and _grace_is_settable() else
              "torch >= 2.12 lets TORCH_ELASTIC_SHUTDOWN_TIMEOUT lengthen it (this torch fixes it at 30 s)"
              if launcher == "torchrun" else grace_advice(launcher))
    return (f"a checkpoint save took {save_s:.0f} s, but the launcher ({launcher}) kills its trainers {grace_s:.0f} s "
            f"after it forwards a stop signal (SIGTERM on preemption): a stop save (shards only, faster) may be cut "
            f"short, and the run would resume from the checkpoint before. {advice[0].upper()}{advice[1:]}. "
            f"--max_wall_time stops are not affected (no signal).")


class WallClock:
    """--max_wall_time: stop while there is still time for one more iteration and a synchronous save."""

    def __init__(self, limit_s: float | None):
        self.start, self.limit = time.monotonic() - _process_age(), limit_s  # a job's limit counts from its start
        self.iteration_s, self.save_s = 0.0, 0.0

    def record_iteration(self, seconds: float) -> None:
        self.iteration_s = max(self.iteration_s * 0.9, seconds)  # decays, but a slow iteration counts at once

    def record_save(self, seconds: float) -> None:
        self.save_s = max(self.save_s, seconds)

    def out_of_time(self) -> bool:
        if self.limit is None:
            return False
        margin = 2 * self.iteration_s + 1.5 * self.save_s + 30  # the stop save itself, with room to spare
        return time.monotonic() - self.start + margin >= self.limit


def _process_age() -> float:
    """Seconds since this process started (Linux), else 0."""
    try:
        start_ticks = float(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return 0.0


def acquire_lock(run_dir) -> Path:
    """Claim `run_dir` for this run, or raise SystemExit naming the run that holds it.

    The lock is a file created exclusively (works on shared file systems) holding host, pid and start time; its
    modification time is a heartbeat (`heartbeat`). A lock whose process is gone (same host) or whose heartbeat
    stopped LOCK_STALE_S ago (any host) is taken over with a warning. Creating it also proves the folder writable.
    """
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create the run folder {run_dir} ({e.strerror}); choose another --output_root.")
    path = run_dir / LOCK
    me = f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_holder(path)
            if holder is None or not _is_stale(path, holder):
                host, pid = holder[:2] if holder else ("?", "?")
                raise SystemExit(f"{run_dir} is in use by another training run (host {host}, pid {pid}). Wait for "
                                 f"it to end, or choose another --name. If that run is dead, delete {path}.")
            logger.warning("taking over %s left by a run that is gone (host %s, pid %s)", path, *holder[:2])
            path.unlink(missing_ok=True)
            continue
        except OSError as e:
            raise SystemExit(f"cannot write in the run folder {run_dir} ({e.strerror}); checkpoints could not be "
                             "saved there. Fix its permissions or choose another --output_root.")
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return path
    raise SystemExit(f"{path}: could not take the lock; another run started at the same moment?")


HEARTBEAT_S = 60  # far below LOCK_STALE_S


def keep_lock_alive(lock: Path) -> threading.Event:
    """Touch the lock every HEARTBEAT_S from a background thread for as long as this process lives (set the
    returned event to stop): the heartbeat goes on through work with no training step in it, such as hours of
    latent-cache encoding, compilation, validation or a long save, which a beat from the loop would miss."""
    stop = threading.Event()

    def beat():
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(lock)
            except OSError:  # removed at exit, or the file system hiccupped: the next beat tries again
                pass

    threading.Thread(target=beat, name="run-lock-heartbeat", daemon=True).start()
    return stop


def release_lock(lock: Path | None) -> None:
    holder = _read_holder(lock) if lock is not None else None
    if holder is not None and holder[:2] == (socket.gethostname(), str(os.getpid())):
        lock.unlink(missing_ok=True)


def _read_holder(path):
    try:
        parts = Path(path).read_text().split()
    except OSError:
        return None
    return tuple(parts) if len(parts) >= 2 else ("?", "?")


def _is_stale(path, holder) -> bool:
    host, pid = holder[:2]
    if host == socket.gethostname() and pid.isdigit():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    try:
        return time.time() - Path(path).stat().st_mtime > LOCK_STALE_S
    except OSError:
        return True


def claim_run(accelerator, run_dir, ckpt_dir, start_over: bool = False) -> int | None:
    """Lock the run folder (main process; released at exit, its heartbeat kept by a thread) and find the checkpoint
    to resume from; every process gets the answer.

    Returns the iteration to resume from or None; exits with the reason on every process if the folder is taken or
    cannot be written.
    """
    import atexit

    from . import run_folder
    from .distributed import from_main_process

    def claim():
        lock = acquire_lock(run_dir)
        keep_lock_alive(lock)
        atexit.register(release_lock, lock)
        record_exit_code(run_dir, None)  # a code left by an earlier run no longer says anything
        run_folder.remove_leftovers(ckpt_dir)
        return run_folder.resume_point(ckpt_dir, start_over)
    return from_main_process(claim)


def check_resume_settings(run_dir, config_yaml: str, fatal_keys, iteration: int, write_history: bool) -> None:
    """On resume, against the run's saved config.yaml: refuse a change of any of `fatal_keys` (model or data
    shape); list what else changed (it applies from here on, the optimizer and schedule settings included) and
    append it to the run's config_history.yaml."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return
    saved, now = yaml.safe_load(path.read_text()), yaml.safe_load(config_yaml)
    # a setting the saved config lacks is newer than the run, which used its default
    changed = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k not in ("config", "dryrun")}
    fatal = {k: v for k, v in changed.items() if k in fatal_keys}
    if fatal:
        raise SystemExit(f"{run_dir}: cannot resume with a different model or data shape: "
                         + "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in fatal.items())
                         + ". Use a new --name, or restore the original flags.")
    if changed:
        logger.warning("resuming with changed settings, applied from iteration %d on: %s", iteration + 1,
                       "; ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()))
        if write_history:
            with open(Path(run_dir) / "config_history.yaml", "a") as f:
                yaml.safe_dump([{"resumed_at_iteration": iteration, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
                                 "changed": {k: {"from": a, "to": b} for k, (a, b) in changed.items()}}], f,
                               sort_keys=False)


def apply_optimizer_settings(optimizer, scheduler, lr, betas, eps: float, weight_decay: float) -> None:
    """After restoring a checkpoint: the optimizer and schedule settings of this command, not the saved ones. `lr`:
    one learning rate for every group, or a list of one per group."""
    inner = getattr(optimizer, "optimizer", optimizer)
    scheduler.base_lrs = list(lr) if isinstance(lr, (list, tuple)) else [lr for _ in scheduler.base_lrs]
    for group, lr, lr_lambda in zip(inner.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group.update(betas=tuple(betas), eps=eps, weight_decay=weight_decay, initial_lr=lr,
                     lr=lr * lr_lambda(scheduler.last_epoch))
    scheduler._last_lr = [group["lr"] for group in inner.param_groups]
