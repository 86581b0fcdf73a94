"""How the scripts talk to the terminal: an error a user can cause ends in one line (what, which file, the fix) and an
exit code, the traceback going to a log file; output survives a terminal or launcher that went away.

    if __name__ == "__main__":
        run_main(main, "infer_text2image.py")

COSMOS_T2I_DEBUG=1 prints the traceback too.
"""

import argparse
import io
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEBUG_ENV = "COSMOS_T2I_DEBUG"


class ResilientStream(io.TextIOBase):
    """A text stream over another that never raises on write or flush, and copies whole lines to a log file.

    accelerate launch >= 1.16 pipes its trainer's stderr through itself: once the launcher is gone, a write raised
    BrokenPipeError and ended the trainer before its stop save. Writes to a stream that failed are dropped; lines
    with a carriage return (progress bars redrawn in place) are not copied to the log file.
    """

    def __init__(self, stream):
        self.stream, self.log, self.broken = stream, None, False
        self.writing, self.pending = False, []

    def write(self, text: str) -> int:
        """A write from a signal handler that interrupted one in progress (the stop signals print a line) is queued
        and written right after it: the file objects beneath raise RuntimeError on such a reentrant call, which
        ended a trainer in the middle of its stop."""
        self.pending.append(text)
        while self.pending and not self.writing:
            self.writing = True
            try:
                while self.pending:
                    self._write(self.pending.pop(0))
            finally:
                self.writing = False
        return len(text)

    def _write(self, text: str) -> None:
        if not self.broken:
            try:
                self.stream.write(text)
            except (OSError, ValueError):  # EPIPE, EIO, or a closed file
                self.broken = True
        if self.log is not None and "\r" not in text:
            try:
                self.log.write(text)
                self.log.flush()
            except (OSError, ValueError):
                self.log = None

    def flush(self) -> None:
        if not self.broken and not self.writing:  # a write in progress flushes its own
            try:
                self.stream.flush()
            except (OSError, ValueError):
                self.broken = True

    def isatty(self) -> bool:
        try:
            return not self.broken and self.stream.isatty()
        except (OSError, ValueError):
            return False

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self):
        return getattr(self.stream, "encoding", "utf-8")

    def writable(self) -> bool:
        return True

    def __getattr__(self, name):  # anything else (buffer, errors, name) as the wrapped stream has it
        return getattr(self.stream, name)


def resilient_output() -> None:
    """Put ResilientStream over stdout and stderr (once); call before logging is configured."""
    for name in ("stdout", "stderr"):
        if not isinstance(getattr(sys, name), ResilientStream):
            setattr(sys, name, ResilientStream(getattr(sys, name)))


_log_path: Path | None = None


def log_to_file(path) -> Path | None:
    """Copy everything written to stdout and stderr from now on into `path` (appended), where a user reads what
    happened after a preemption or a closed terminal; returns the path, or None if it cannot be written."""
    global _log_path
    resilient_output()
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1)
    except OSError:
        return None
    try:
        log.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {' '.join(sys.argv)}\n")
    except OSError:
        return None
    sys.stdout.log = sys.stderr.log = log
    _log_path = path
    thread_errors_to_log()
    return path


def thread_errors_to_log() -> None:
    """An exception that ends a background thread (torch.distributed.checkpoint's file writers on a full disk) goes
    with its traceback to the run's log file only; the thread that waits for it reports it in one line."""
    import threading

    def hook(args):
        log = getattr(sys.stderr, "log", None)
        if log is None:
            return threading.__excepthook__(args)
        try:
            log.write(f"exception in thread {args.thread.name if args.thread else '?'}:\n" + "".join(
                traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)))
        except (OSError, ValueError):
            pass
    threading.excepthook = hook


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """parser.error prints one line naming the script and --help, not argparse's usage block."""
    def error(message):
        sys.stderr.write(f"{parser.prog}: error: {message} (see --help)\n")
        sys.exit(2)
    parser.error = error
    return parser


def run_main(main, script: str) -> None:
    """Run a script's main(); an exception becomes one line on stderr and exit code 1, its traceback written to the
    run's log file (log_to_file), or to a file in the temporary folder whose name the line gives."""
    resilient_output()
    if "TORCHELASTIC_ERROR_FILE" in os.environ:  # under torchrun: the error in its summary (importing torch costs 2 s)
        from torch.distributed.elastic.multiprocessing.errors import record
        main = record(main)
    try:
        main()
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{script}: interrupted\n")
        sys.exit(130)
    except Exception as error:
        sys.stderr.flush()
        sys.stderr.write(f"{script} failed: {describe(error)}{where_traceback_went(error)}\n")
        sys.exit(1)


def first_failure(error: BaseException) -> BaseException | None:
    """The first process's exception inside torch.distributed.checkpoint's CheckpointException, else None."""
    failures = getattr(error, "failures", None)  # {rank: (exception, stack summary)}
    return next((v[0] if isinstance(v, tuple) else v for v in failures.values()), None) if failures else None


def describe(error: BaseException) -> str:
    """`Type: message` of the root cause, on one line (torch.distributed.checkpoint wraps each process's failure)."""
    for _ in range(10):
        inner = first_failure(error)
        if inner is None or inner is error:
            break
        error = inner
    message = str(error)
    if "Original Traceback (most recent call last)" in message:  # a DataLoader worker's error, its traceback inside
        return describe_text(message.strip().splitlines()[-1])
    return describe_text(f"{type(error).__name__}: {' '.join(message.split()) or repr(error)}")


def describe_text(text: str) -> str:
    """One line of at most ~700 characters, shortened in the middle (the fix comes last)."""
    text = " ".join(text.split())
    return text if len(text) <= 700 else f"{text[:350]} [...] {text[-300:]}"  # the fix comes last: keep it


def size_text(n_bytes: float) -> str:
    """1.23 GB, or 45.6 MB below 0.1 GB."""
    return f"{n_bytes / 1e9:.2f} GB" if n_bytes >= 1e8 else f"{n_bytes / 1e6:.1f} MB"


def where_traceback_went(error: BaseException) -> str:
    """Write the traceback to the log file (or a temporary file) and return the text that says where."""
    text = "".join(traceback.format_exception(error))
    if os.environ.get(DEBUG_ENV):
        sys.stderr.write(text)
        return ""
    if _log_path is not None and getattr(sys.stderr, "log", None) is not None:
        try:
            sys.stderr.log.write(text)  # the file only
            return f" (traceback in {_log_path})"
        except OSError:  # the log's own disk is full: the temporary folder, below
            pass
    try:
        with tempfile.NamedTemporaryFile("w", prefix="cosmos_t2i-", suffix=".traceback", delete=False) as f:
            f.write(text)
        return f" (traceback in {f.name}; {DEBUG_ENV}=1 prints it)"
    except OSError:
        return f" ({DEBUG_ENV}=1 prints the traceback)"
