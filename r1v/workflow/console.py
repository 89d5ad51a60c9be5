"""What a person running `r1v run` sees: one line per stage, then the status table; everything else goes to
RUN/logs/.

Why file-descriptor redirection and not only `sys.stdout`: Ray's log monitor (worker output forwarded to the
driver), torch/gloo C++ warnings, tqdm bars and child processes write to fds 1 and 2 directly or through stream
objects created before the run, so only `os.dup2` catches them all. Progress lines go to a duplicate of the
original stdout taken before the redirection (or, when stdout is not a real fd as under pytest's capsys, to the
stream object itself).

Layout: RUN/logs/driver.log holds what the driver printed outside stages (MLflow set-up, Ray's shutdown);
`ray.init` runs when the first stage that needs Ray starts, so its lines are in that stage's log;
RUN/logs/<stage>.log holds everything printed while that stage ran, its Ray workers' forwarded output included,
and, on failure, the full traceback. Worker lines that Ray forwards after a stage has ended (rare: the log
monitor polls every 0.1 s and `RAY_DEDUP_LOGS` is off here) land in the next file.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import io
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from r1v.core.noise import quiet_libraries
from r1v.workflow.progress import duration

ERROR_TAIL = 10  # lines of a failing stage's error shown on the console


def _now() -> str:
    return dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")


def show_path(path: Path) -> str:
    """A path as short as is unambiguous: relative to the working directory when it lies under it."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _flush_all() -> None:
    for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        with contextlib.suppress(Exception):
            s.flush()
    with contextlib.suppress(Exception):  # C stdio buffers (printf from native code)
        ctypes.CDLL(None).fflush(None)


def _console_stream(stream: TextIO) -> TextIO:
    """A stream that keeps reaching the console after fds 1 and 2 are redirected."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return stream  # not a real fd (pytest's capsys, a StringIO): redirection does not touch it
    if fd not in (1, 2):
        return stream
    return open(os.dup(fd), "w", buffering=1, encoding=getattr(stream, "encoding", None) or "utf-8",
                errors="backslashreplace")


def error_lines(exc: BaseException) -> list[str]:
    """The lines of an exception's message (a Ray task or training failure carries the remote traceback),
    without blank lines and the `^^^^` markers under traceback lines."""
    err = getattr(exc, "cause", None) or exc.__cause__ or exc
    text = "".join(traceback.format_exception_only(type(err), err))
    lines = [line.rstrip() for line in text.splitlines() if line.strip(" ^~\t")]
    return lines or [type(err).__name__]


class StageReporter:
    """What the workflow engine calls around each stage. This base class reports nothing (library use, tests)."""

    def skipped(self, name: str, kind: str, index: int, total: int) -> None:
        pass

    def line(self, text: str) -> None:
        pass

    @contextlib.contextmanager
    def stage(self, name: str, kind: str, index: int, total: int,
              watch: Callable[[], str] | None = None) -> Iterator[None]:
        """`watch()`: the running stage's progress line (step / total, key metric, rate, ETA), or ""."""
        yield


class Console(StageReporter):
    """Progress lines on the console; with `verbose=False`, fds 1/2 go to RUN/logs while it is open.

    Use: `with Console(verbose) as con: ... con.attach(run_dir) ...`. Output before `attach` (run directory
    creation) is kept in a temporary file and moved to RUN/logs/driver.log.
    """

    PROGRESS_LINE_S = 60.0
    """Without a terminal (a log, a pipe, a submitted job's `--follow`): a progress line this often, when the
    stage's progress changed."""
    WATCH_S = 3.0
    """How often the stage's progress file is read (from the store, with an object-store run root)."""

    def __init__(self, verbose: bool = False, stream: TextIO | None = None) -> None:
        self.verbose = verbose
        self._stream_arg = stream
        self.out: TextIO = stream or sys.stdout
        self.tty = False
        self.log_dir: Path | None = None
        self._saved: tuple[int, int, TextIO, TextIO] | None = None
        self._pending_fd: int | None = None
        self._summary: str | None = None
        self._in_stage = False
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- capture
    def __enter__(self) -> Console:
        quiet_libraries(self.verbose)
        base = self._stream_arg or sys.stdout
        self.tty = bool(getattr(base, "isatty", lambda: False)())
        if self.verbose:
            self.out = base
        else:
            self.out = _console_stream(base)
            _flush_all()
            self._saved = (os.dup(1), os.dup(2), sys.stdout, sys.stderr)
            with tempfile.TemporaryFile() as tmp:  # unlinked at once; the duplicate fd keeps it alive
                self._pending_fd = os.dup(tmp.fileno())
            self._point_fds(self._pending_fd)
            # Python-level writers follow fds 1/2 from now on, whatever they are pointed at next.
            sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8",
                                          errors="backslashreplace", line_buffering=True, write_through=True)
            sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                          errors="backslashreplace", line_buffering=True, write_through=True)
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        if self._saved is None:
            return
        _flush_all()
        fd1, fd2, out, err = self._saved
        self._saved = None
        os.dup2(fd1, 1)
        os.dup2(fd2, 2)
        os.close(fd1)
        os.close(fd2)
        sys.stdout, sys.stderr = out, err
        if self._pending_fd is not None:  # never attached (e.g. a config error): show what was printed
            os.lseek(self._pending_fd, 0, os.SEEK_SET)
            with open(self._pending_fd, "rb") as f:
                data = f.read()
            self._pending_fd = None
            if data:
                self._emit(data.decode("utf-8", "replace").rstrip("\n"))
        if self.out is not out and self.out is not self._stream_arg:
            with contextlib.suppress(Exception):
                self.out.close()

    @staticmethod
    def _point_fds(fd: int) -> None:
        _flush_all()
        os.dup2(fd, 1)
        os.dup2(fd, 2)

    def _open_log(self, name: str) -> int:
        assert self.log_dir is not None
        return os.open(self.log_dir / f"{name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def attach(self, run_dir: Path) -> None:
        """From now on output goes to RUN/logs/driver.log (with what was printed before this call)."""
        self.log_dir = Path(run_dir) / "logs"
        if self._saved is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fd = self._open_log("driver")
        if self._pending_fd is not None:
            _flush_all()
            os.lseek(self._pending_fd, 0, os.SEEK_SET)
            while chunk := os.read(self._pending_fd, 1 << 16):
                os.write(fd, chunk)
            os.close(self._pending_fd)
            self._pending_fd = None
        self._point_fds(fd)
        os.close(fd)

    def log_path(self, name: str) -> Path | None:
        return None if self.log_dir is None or self._saved is None else self.log_dir / f"{name}.log"

    # ----------------------------------------------------------------- console lines
    def _emit(self, line: str, end: str = "\n") -> None:
        with self._lock:
            self.out.write(line + end)
            self.out.flush()

    def line(self, text: str) -> None:
        """A line for the console (and, while capturing, a copy in the current log for context)."""
        self._emit(text)
        if self._saved is not None:
            print(text, flush=True)

    def skipped(self, name: str, kind: str, index: int, total: int) -> None:
        self.line(f"{_prefix(name, kind, index, total)} ... skipped (done)")

    def summary(self, text: str) -> None:
        self._summary = " ".join(text.split())
        if self._saved is not None:
            print(f"r1v: summary: {self._summary}", flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, kind: str, index: int, total: int,
              watch: Callable[[], str] | None = None) -> Iterator[None]:
        head = f"{_prefix(name, kind, index, total)} ..."
        log = self.log_path(name)
        self._summary, self._in_stage = None, True
        live = self.tty and not self.verbose
        stop = threading.Event()
        t0 = time.time()
        if live:
            self._emit(head, end="")
        else:
            self._emit(head)
        if live or watch is not None:
            threading.Thread(target=self._tick, args=(head, t0, stop, live, watch), daemon=True).start()
        if log is not None:
            fd = self._open_log(name)
            self._point_fds(fd)
            os.close(fd)
            print(f"===== {_now()} stage {name} ({kind}) started =====", flush=True)
        try:
            yield
        except BaseException as e:
            secs = time.time() - t0
            if log is not None:
                traceback.print_exception(e)
                print(f"===== {_now()} stage {name} failed after {secs:.1f}s =====", flush=True)
            self._end_stage(stop, live)
            lines = error_lines(e)
            where = f"  (log: {show_path(log)})" if log is not None else ""
            if isinstance(getattr(e, "cause", e), KeyboardInterrupt):
                self._emit(f"{head} interrupted after {secs:.1f}s{where}")
            else:
                self._emit(f"{head} FAILED after {secs:.1f}s: {_clip(lines[-1])}{where}")
                for extra in lines[-ERROR_TAIL - 1 : -1]:  # the error's context, when it has more lines
                    self._emit(f"    | {_clip(extra)}")
            raise
        secs = time.time() - t0
        if log is not None:
            print(f"===== {_now()} stage {name} done in {secs:.1f}s =====", flush=True)
        self._end_stage(stop, live)
        self._emit(f"{head} done in {secs:.1f}s")
        if self._summary:
            self._emit(f"      {self._summary}")

    def _end_stage(self, stop: threading.Event, live: bool) -> None:
        """Wait briefly for Ray's log monitor to forward the stage's last worker lines, then back to driver.log."""
        stop.set()
        self._in_stage = False
        if self._saved is not None and self.log_dir is not None:
            ray = sys.modules.get("ray")
            if ray is not None and ray.is_initialized():
                time.sleep(0.3)
            fd = self._open_log("driver")
            self._point_fds(fd)
            os.close(fd)
        if live:
            self._emit("\r\x1b[2K", end="")

    def _columns(self) -> int:
        try:
            return max(20, os.get_terminal_size(self.out.fileno()).columns - 1)
        except (AttributeError, OSError, ValueError):
            return 119

    def _tick(self, head: str, t0: float, stop: threading.Event, live: bool,
              watch: Callable[[], str] | None) -> None:
        """On a terminal, the stage line redrawn every second: elapsed time and progress. Elsewhere, a progress
        line every `PROGRESS_LINE_S` when there is news."""
        text, read_at, shown, shown_at = "", -float("inf"), "", time.time()
        while not stop.wait(min(1.0, self.WATCH_S)):
            now = time.time()
            if watch is not None and now - read_at >= self.WATCH_S:
                read_at = now
                try:
                    text = watch() or ""
                except Exception:  # a store that does not answer: the line shows what it had
                    pass
            with self._lock:
                if stop.is_set():
                    return
                if live:
                    line = f"\r\x1b[2K{head} {duration(now - t0)}" + (f"  {text}" if text else "")
                    self.out.write(line[: self._columns() + 5])  # +5: the escape sequence takes no columns
                    self.out.flush()
                elif text and text != shown and now - shown_at >= self.PROGRESS_LINE_S:
                    shown, shown_at = text, now
                    self.out.write(f"      {duration(now - t0)}: {text}\n")
                    self.out.flush()


def _prefix(name: str, kind: str, index: int, total: int) -> str:
    return f"[{index}/{total}] {name} ({kind})"


def _clip(text: str, n: int = 300) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


_ACTIVE: list[Console] = []


def summary(text: str) -> None:
    """A stage's one-line result (e.g. "loss 0.12, 48 rows"), shown on the console under the stage's done line.

    Call it from stage code in the driver process (not from a Ray worker). Without an active console (library
    use, tests) the text is simply printed.
    """
    if _ACTIVE and _ACTIVE[-1]._in_stage:
        _ACTIVE[-1].summary(text)
    else:
        print(text)
