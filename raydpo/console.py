"""What a command shows on the console, and its full log.

`run_log` puts the process's own file descriptors 1 and 2 behind pipes for the length of a command, so
that everything printed there (raydpo's lines, Ray's, the workers' lines that Ray forwards, native
libraries' C++ logs) goes whole to a log file, while the console gets the same lines less the known
noise of the libraries (execution plans, checkpoint bookkeeping, build notices), each line once. On a
terminal, status lines (a stage's progress, training's step line) are redrawn in place; elsewhere (a
file, `ray job logs`) they are plain lines.

    with run_log("train") as log:
        ...                        # the command
        keep_log_in(output)        # the log is copied to OUTPUT/logs/train-<UTC time>.log at the end
    print(log.keep())
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

from raydpo.errors import RaydpoError, StageFailed, one_line

LOGS_DIR = "logs"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# a line rank 0 prints for each logged training step (`loop.progress_line`): a status line on a terminal
STEP_LINE = re.compile(r"\bstep \d+/\d+ \(\d+%\)")
# lines the libraries print that tell a user nothing they act on; the log file keeps them
NOISE = re.compile(
    "|".join(
        (
            # Ray Data's bookkeeping per dataset execution (raydpo prints its own progress)
            r"Starting execution of Dataset",
            r"Execution plan of Dataset",
            r"Dataset \S+ execution (finished in|failed)",
            r"Data sink \S+ finished\.",
            r"Tip: Use `take_batch\(\)`",
            r"Progress (bars|will be logged|bars for operators)",
            r"logging_progress\.py",
            r"Registered dataset logger for dataset",
            # Ray Train's worker-group and checkpoint bookkeeping
            r"Requesting resources: \{",
            r"Attempting to start training worker group",
            r"Started training worker group of size",
            r"- \(ip=\S+, pid=\d+\) world_rank=",
            r"Setting up process group for",
            r"Checkpoint successfully created at",
            r"Reporting training result \d+",
            # notices of the libraries on a CPU machine and at start-up
            r"Setting accelerator to CPU",
            r"deepspeed_shm_comm_op built successfully",
            r"A module has unknown inputs or outputs type",
            r"mlflow\.store\.db\.utils",
            r"mlflow\.system_metrics",
            r"PYTHON worker processes have been started on node",
            r"has constructor arguments in the object store",
            r"Token authentication is enabled for this Ray cluster",
            # the GCS killing an actor whose process has already exited (the precompute's, at its end)
            r"Failed to kill actor \w+, return status: .*Socket closed",
            r"^(\(\S+ pid=\d+\) )?(Loading weights|Writing model shards|Loading checkpoint shards):",
        )
    )
)
# Ray Data's loggers that report a failed execution with its traceback: a command's own last line says
# what failed, and these records go to its log only (`_LogOnly`)
LOG_ONLY_LOGGERS = ("ray.data.exceptions", "ray.data._internal.execution.streaming_executor_state")
# Records of several lines that the libraries print for a failure raydpo reports in its own line (a
# worker failure, a failed run): (first line, last line) of each, after the "(Name pid=N) " prefix of a
# Ray process; the console leaves them out, the log keeps them
LOG_ONLY_BLOCKS = (
    # Ray Train's failure policy, with the worker group's whole error
    (re.compile(r"\[FailurePolicy\] "), re.compile(r"^ray\.train\.\w*Error: ")),
    # the warning, with its traceback, of a worker group shut down after a worker died
    (re.compile(r"Graceful shutdown of backend failed"), re.compile(r"^[\w.]+(Error|Exception): ")),
)
BLOCK_LINES = 200  # a block whose last line does not come is shown again after this many lines
RAY_PREFIX = re.compile(r"^\(\S+ pid=\d+(?:, ip=[^)]*)?\) ")
LOG_STATUS_SECONDS = 30.0  # the log keeps a terminal's status line this often, and its final state
RECENT_LINES = 64  # a line seen among the last this many is not shown again (Ray repeats some)

_active: Console | None = None
_log: RunLog | None = None


class Console:
    """The console side of a command's output: noise filtered, repeats dropped, status lines in place.

    `out` is the file descriptor of the real console's stdout (duplicated before the tee took fd 1; each
    line names its own descriptor); `log` receives every line."""

    def __init__(self, out: int, log, terminal: bool) -> None:
        self.out, self.log, self.terminal = out, log, terminal
        self.recent: collections.deque[str] = collections.deque(maxlen=RECENT_LINES)
        self.status_text = ""
        self.status_logged = float("-inf")  # when a status line last went to the log
        self.blocks: dict[str, tuple[re.Pattern, int]] = {}  # source prefix -> (last line, lines left)
        self.lock = threading.Lock()

    def line(self, raw: str, fd: int) -> None:
        """One line that reached fd 1 or 2 of the process (`fd` is the console's copy of it)."""
        text = _final_text(raw)
        with self.lock:
            self.log.write(text + "\n")
            if text and NOISE.search(text):
                return
            if text and self._in_block(text):
                self.recent.append(text)  # Ray repeats an error's message after its block
                return
            if text and text in self.recent:
                return
            if text:
                self.recent.append(text)
            if self.terminal and STEP_LINE.search(text):
                self._draw(text)
                return
            self._commit_status()
            _write(fd, (raw if self.terminal else text) + "\n")

    def _in_block(self, text: str) -> bool:
        """Whether the line belongs to one of `LOG_ONLY_BLOCKS`, within the lines of its source."""
        prefix = RAY_PREFIX.match(text)
        source = prefix.group(0) if prefix else ""
        body = text[len(source) :]
        if source in self.blocks:
            last, left = self.blocks.pop(source)
            if not last.search(body) and left > 1:
                self.blocks[source] = (last, left - 1)
            return True
        for first, last in LOG_ONLY_BLOCKS:
            if first.match(body):
                self.blocks[source] = (last, BLOCK_LINES)
                return True
        return False

    def status(self, text: str, final: bool = False) -> None:
        """A progress line: redrawn in place on a terminal (kept once `final`), else a plain line."""
        with self.lock:
            now = time.monotonic()
            if final or not self.terminal or now - self.status_logged >= LOG_STATUS_SECONDS:
                self.log.write(text + "\n")  # on a terminal, redrawn often: the log keeps some
                self.status_logged = now
            if not self.terminal:
                _write(self.out, text + "\n")
                return
            self._draw(text)
            if final:
                self._commit_status()

    def _draw(self, text: str) -> None:
        self.status_text = text
        _write(self.out, "\r\x1b[K" + text)

    def _commit_status(self) -> None:
        """Leave the status line as it stands and go on below it."""
        if self.status_text:
            _write(self.out, "\n")
            self.status_text = ""


def status(text: str, final: bool = False) -> None:
    """A progress line of the running command (`Console.status`); outside `run_log` (the Python API in a
    notebook or a script), redrawn in place where stdout is a terminal, else printed."""
    if _active is not None:
        _active.status(text, final)
        return
    if sys.stdout.isatty():
        print("\r\x1b[K" + text, end="\n" if final else "", flush=True)
    else:
        print(text, flush=True)


def terminal() -> bool:
    """Whether the command's console is a terminal (fd 1 is a pipe of `run_log` while it runs)."""
    return _active.terminal if _active is not None else sys.stdout.isatty()


class RunLog:
    """The log file of one command: written under the temp dir while it runs, then copied to
    OUTPUT/logs/ once the command names its output (`keep_log_in`) and that directory exists."""

    def __init__(self, name: str) -> None:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        self.name = f"{name}-{stamp}.log"
        directory = Path(tempfile.gettempdir(), "raydpo-logs")
        directory.mkdir(parents=True, exist_ok=True)
        self.path = str(directory / f"{os.getpid()}-{self.name}")
        self.file = open(self.path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115
        self.file.write(f"# {' '.join(sys.argv)}  (pid {os.getpid()}, {stamp})\n")
        self.output: str | None = None

    def keep(self) -> str:
        """Copy the log to OUTPUT/logs/ (a local directory or a URI) where OUTPUT exists; returns where the
        log is. The temporary file is then unlinked (what is printed later, Ray's shutdown, goes to the
        console only)."""
        self.file.flush()
        if not self.output:
            return self.path
        import pyarrow.fs as pafs

        from raydpo import cache

        try:
            fs, root = cache.resolve(self.output)
            if fs.get_file_info(root).type != pafs.FileType.Directory:
                return self.path
            fs.create_dir(f"{root}/{LOGS_DIR}", recursive=True)
            with (
                open(self.path, "rb") as source,
                fs.open_output_stream(f"{root}/{LOGS_DIR}/{self.name}") as sink,
            ):
                shutil.copyfileobj(source, sink)
        except OSError:
            return self.path
        os.unlink(self.path)
        return cache.join(self.output, LOGS_DIR, self.name)

    def discard(self) -> None:
        """Remove the temporary file, if `keep` left it (the output did not exist)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def keep_log_in(output: str) -> None:
    """Name the output directory whose logs/ keeps the running command's log (no-op outside `run_log`)."""
    if _log is not None:
        _log.output = output


@contextlib.contextmanager
def run_log(name: str) -> Iterator[RunLog]:
    """Tee fd 1 and 2 of this process into a log file, and the console through `Console`, until the
    block ends; an exception's traceback goes to the log file. Child processes started meanwhile (a
    local Ray instance) inherit the pipes; their later lines still reach the console and the log
    through reader threads that live as long as the pipes."""
    global _active, _log
    log = RunLog(name)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    console = Console(saved[1], log.file, os.isatty(saved[1]))
    markers = {}
    for fd in (1, 2):
        read_end, write_end = os.pipe()
        os.dup2(write_end, fd)
        os.close(write_end)
        markers[fd] = (f"raydpo-log-end-{os.getpid()}-{fd}-{id(log)}", threading.Event())
        threading.Thread(target=_pump, args=(read_end, console, saved[fd], *markers[fd]), daemon=True).start()
    _active, _log = console, log
    log_only = _LogOnly(console)
    for name in LOG_ONLY_LOGGERS:
        logging.getLogger(name).addFilter(log_only)
    try:
        yield log
    except BaseException:
        with console.lock:
            log.file.write(traceback.format_exc())
        raise
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        for fd, (marker, _) in markers.items():  # what was written before this point reaches the log
            os.write(fd, f"{marker}\n".encode())
        for _, seen in markers.values():
            seen.wait(timeout=5)
        with console.lock:
            console._commit_status()
        _active, _log = None, None
        for name in LOG_ONLY_LOGGERS:
            logging.getLogger(name).removeFilter(log_only)
        for fd in (1, 2):
            os.dup2(saved[fd], fd)


def run_command(prog: str, command: Callable[[], None], log: str | None = None) -> int:
    """Run an entry point's body: one line on stderr and exit code 2 for bad input, 1 for a failed run.

    With `log` (a name: "train"), the command's whole output also goes to a log file (`run_log`),
    whose path is the last line on stdout, or for a failed run the line before the error on stderr."""
    from raydpo.cluster import leave_ray

    ray = sys.modules.get("ray")
    connected_before = ray is not None and ray.is_initialized()  # a caller's connection is left alone
    with run_log(log) if log else contextlib.nullcontext() as session, _info_lines():
        try:
            command()
        except RaydpoError as error:
            message, code = f"{prog}: error: {one_line(error, limit=None)}", 2
        except StageFailed as error:
            message, code = f"{prog}: {one_line(error, limit=None)}", 1
            if session is not None:  # what failed in full, behind the one line
                session.file.write("".join(traceback.format_exception(error)))
        except KeyboardInterrupt:  # Ctrl-C outside a stage's own handling
            message, code = f"{prog}: interrupted", 130
        else:
            message, code = None, 0
        if session is not None and not connected_before:
            leave_ray()  # inside the log: Ray's shutdown and the workers' last lines are filtered too
        if session is not None and message:
            session.file.write(message + "\n")
    if session is not None:
        where = session.keep()
        if code == 2:  # bad input: the one line says it all; a log outside an output is not kept
            session.discard()
        else:
            print(f"full log: {where}", file=sys.stderr if code else sys.stdout, flush=True)
    if message:
        print(message, file=sys.stderr)
    return code


@contextlib.contextmanager
def _info_lines() -> Iterator[None]:
    """raydpo's info and warning lines on stderr for the length of a command (a library leaves the
    logging set-up to its caller; a command is its own caller)."""
    logger = logging.getLogger("raydpo")
    handler, level = logging.StreamHandler(sys.stderr), logger.level
    handler.setFormatter(logging.Formatter("raydpo: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class _LogOnly(logging.Filter):
    """Writes the error records of a library's logger to the command's log, and marks them hidden from
    the console for Ray Data's handlers (their `HiddenRecordFilter`; Ray Data's own log file still gets
    them)."""

    FORMAT = logging.Formatter("%(asctime)s\t%(levelname)s %(filename)s:%(lineno)s -- %(message)s")

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            with self.console.lock:
                self.console.log.write(self.FORMAT.format(record) + "\n")
            record.hide = True
        return True


def _pump(read_end: int, console: Console, fd: int, marker: str, seen: threading.Event) -> None:
    pending = b""
    while chunk := os.read(read_end, 1 << 16):
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            text = line.decode("utf-8", errors="replace")
            if text == marker:
                seen.set()
                continue
            console.line(text, fd)


def _final_text(raw: str) -> str:
    """A line as it reads on a screen: colour codes removed, and of a line redrawn with carriage returns
    (a progress bar), its last state."""
    parts = [part for part in ANSI.sub("", raw).split("\r") if part.strip()]
    return parts[-1].rstrip() if parts else ""


def _write(fd: int, text: str) -> None:
    data = text.encode("utf-8", errors="replace")
    while data:
        data = data[os.write(fd, data) :]
