"""A clean console: our progress and results on the terminal; library chatter in a log file.

Library chatter is: lines Ray forwards from its workers and raylet (`(RayTrainWorker pid=...) ...`, `(raylet) ...`)
unless they are our own progress lines (`[pretrain] ...`), records of third-party loggers (Ray, MLflow, alembic:
lines that start with a timestamp and a level), and Python warnings raised outside scpert_dist. They go to the log
file (opened at the first such line, announced once on the console). A line repeated back to back (Ray forwards
some worker lines on both streams) is printed once. `SCPERT_VERBOSE=1` (or `--verbose` where a command has it)
keeps everything on the console. `library_output()` is a block inside which what a library prints (stdout, stderr,
its loggers, warnings; cell-eval's and pertpy's tqdm bars and log records) goes to the log file as well.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
import warnings
from pathlib import Path

REPEATED = re.compile(r"\s*\[repeated \d+x across cluster\].*$")
"""Ray's suffix on a line it deduplicated across workers."""
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
WORKER = re.compile(r"^\((?P<who>(?:[^()]|\([^()]*\))*?(?:pid=\S+|raylet|autoscaler|gcs_server)(?:[^()]|\([^()]*\))*)\)"
                    r"\s?(?P<msg>.*)$")
"""A line Ray forwards from a process: `(RayTrainWorker pid=1) ...`, `(MapBatches(prepare_batch) pid=2) ...`, `(raylet) ...`."""
OURS = re.compile(r"^\[(pretrain|finetune|sweep|simulate|benchmark|demo|ingest)\b|^epoch \d+: |^benchmark: ")
LIB_RECORD = re.compile(r"^(\[)?\d{4}[-/]\d\d[-/]\d\d[ T]\d\d:\d\d:\d\d[,.]?\d*\]?\s+(\[?\d+\]?\s+)?"
                        r"(DEBUG|INFO|WARNING|WARN|ERROR|SUCC|I|W|E)\b")
TUNE_STATUS = re.compile(r"^(Trial status:|Current time:|Logical resource usage:|Current best trial:|"
                         r"View detailed results here:|To visualize your results with TensorBoard|Training started with"
                         r"|Training finished iteration|Training completed after|Trial \S+ (started|completed|finished))")
"""Ray Tune's status lines and trial events (shown with --verbose). Box-drawn tables are not matched: our own
`--help` is one."""
MLFLOW_CHATTER = re.compile(r"^(🏃 View run |🧪 View experiment at)")
"""MLflow's per-run links (printed at every run's end on a tracking server; the sweep prints the one that matters)."""
PY_WARNING = re.compile(r"^\S+:\d+: \w*Warning: |^\s+warnings\.warn\(|^\s+self\.\w+ = \w+$")
"""A warning printed by Python (`file.py:12: FutureWarning: ...`) and its source-line echo."""


class Console:
    """Routes lines to the terminal or the log file; one per process (see `install`)."""
    def __init__(self, log_path: Path, verbose: bool = False):
        self.log_path = Path(log_path)
        self.verbose = verbose
        self._log = None
        self._last = ""
        self.diverted = 0
        self.terminal = sys.stderr  # where the one line about the log file goes
        self.saved_showwarning = warnings.showwarning

    def set_log_path(self, path: str | Path) -> None:
        """Move the log file (e.g. into a run folder) before anything was written to it."""
        if self._log is None:
            self.log_path = Path(path)

    def log(self, text: str) -> None:
        if self._log is None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the process
            self.terminal.write(f"(Ray, MLflow and other library output: {self.log_path})\n")
        self.diverted += 1
        self._log.write(ANSI.sub("", text).rstrip("\n") + "\n")

    def keep(self, line: str) -> str | None:
        """The text to show for one line, or None when it went to the log file (or repeats the previous line)."""
        plain = ANSI.sub("", line).strip()
        if not plain:
            return line
        m = WORKER.match(plain)
        if self.verbose:
            return line
        if m:
            msg = REPEATED.sub("", m.group("msg")).strip()
            if not OURS.search(msg):
                self.log(plain)
                return None
            if msg == self._last:
                return None
            self._last = msg
            return msg
        if any(p.match(plain) for p in (LIB_RECORD, PY_WARNING, TUNE_STATUS, MLFLOW_CHATTER)):
            self.log(plain)
            return None
        if plain == self._last and OURS.search(plain):
            return None
        self._last = plain
        return line

    def showwarning(self, message, category, filename, lineno, file=None, line=None) -> None:
        """Python warnings: ours (raised in scpert_dist) as one console line, the rest into the log file."""
        text = f"{filename}:{lineno}: {category.__name__}: {message}"
        if self.verbose or f"{os.sep}scpert_dist{os.sep}" in str(filename):
            sys.stderr.write(f"warning: {message}\n")
        else:
            self.log(text)


class FilteredStream:
    """A text stream that passes whole lines through `Console.keep` to the real stream."""
    def __init__(self, console: Console, stream):
        self.console, self.stream, self._buf = console, stream, ""

    def write(self, s: str) -> int:
        self._buf += s
        while "\n" in self._buf:
            line, self._buf = self._buf.split("\n", 1)
            kept = self.console.keep(line)
            if kept is not None:
                self.stream.write(kept + "\n")
        if "\r" in self._buf:  # a progress bar redraws in place: show it now
            self.stream.write(self._buf)
            self._buf = ""
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def __getattr__(self, name):  # fileno, isatty, encoding, ... of the real stream
        return getattr(self.stream, name)


_CURRENT: Console | None = None


def current() -> Console | None:
    """The installed console, if any."""
    return _CURRENT


def install(command: str = "scpert", verbose: bool | None = None) -> Console:
    """Filter sys.stdout/sys.stderr and Python warnings from now on (idempotent). The log file defaults to
    scpert_logs/<command>-<time>.log in the working folder; a command with a run folder moves it there."""
    global _CURRENT
    if _CURRENT is not None:
        return _CURRENT
    if verbose is None:
        verbose = os.environ.get("SCPERT_VERBOSE", "") not in ("", "0")
    path = Path(os.environ.get("SCPERT_LOG_FILE") or
                Path("scpert_logs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}.log")
    _CURRENT = Console(path, verbose=verbose)
    sys.stdout = FilteredStream(_CURRENT, sys.stdout)
    sys.stderr = FilteredStream(_CURRENT, sys.stderr)
    warnings.showwarning = _CURRENT.showwarning
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local Ray reports nothing
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no download bars between our lines
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")  # our per-trial lines as they come, not merged and late
    return _CURRENT


def uninstall() -> None:
    """Restore the streams (tests that call the CLI in-process)."""
    global _CURRENT
    for name in ("stdout", "stderr"):
        s = getattr(sys, name)
        if isinstance(s, FilteredStream):
            if s._buf:
                s.stream.write(s._buf)
            setattr(sys, name, s.stream)
    if _CURRENT is not None:
        warnings.showwarning = _CURRENT.saved_showwarning
    _CURRENT = None


class _LibrarySink:
    """A text stream for library output: each line (a progress bar's redraws, split at carriage returns, each
    count) to the installed console's log file, or to the DEBUG level of the `scpert_dist.libraries` logger (silent
    unless asked for) when no console is installed (notebooks, the Python API)."""

    def __init__(self):
        self._buf = ""

    def write(self, s: str) -> int:
        self._buf += s
        *lines, self._buf = re.split(r"[\r\n]", self._buf)
        for line in lines:
            self._emit(line)
        return len(s)

    def _emit(self, line: str) -> None:
        if not line.strip():
            return
        con = current()
        if con is not None:
            con.log(line)
        else:
            logging.getLogger("scpert_dist.libraries").debug(line)

    def flush(self) -> None:
        if self._buf:
            self._emit(self._buf)
            self._buf = ""

    def isatty(self) -> bool:
        return False

    def close(self) -> None:  # a library's handler made inside the block may close its stream at exit
        self.flush()


@contextlib.contextmanager
def library_output(*loggers: str):
    """Inside this block, what third-party libraries print goes to the log file (see `_LibrarySink`), not to the
    console: stdout and stderr (tqdm bars, print), Python warnings, and the records of the named loggers, whose own
    handlers (pdex attaches a stderr handler at import) are set aside until the block ends."""
    sink = _LibrarySink()
    handler = logging.StreamHandler(sink)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    saved = []
    for name in loggers:
        lg = logging.getLogger(name)
        saved.append((lg, lg.handlers[:], lg.propagate))
        lg.handlers, lg.propagate = [handler], False
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sink.write(f"{f}:{n}: {c.__name__}: {m}\n")
            yield
    finally:
        sink.flush()
        for lg, handlers, propagate in saved:
            lg.handlers, lg.propagate = handlers, propagate
