"""What every part of the bench uses: errors, notes, waiting, subprocesses."""

import functools
import os
import selectors
import subprocess
import sys
from typing import Any, List

from . import netutil

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # scripts/
REPO = os.path.dirname(HERE)
BENCH = os.path.join(HERE, "bench")
LOCAL = netutil.LOCAL


class BenchError(Exception):
    """A step that failed; the variant's remaining measurements are skipped."""


def note(msg: str) -> None:
    print("bench: " + msg, file=sys.stderr, flush=True)


# The shared helpers, failing with BenchError: a failed step skips the variant, not the run.
wait_for = functools.partial(netutil.wait_for, interval=0.02, error=BenchError)
recv_exact = functools.partial(netutil.recv_exactly, error=BenchError)
free_port = netutil.free_port
listening = netutil.listening


def percentile(sorted_values: List[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * (len(sorted_values) - 1)))))
    return sorted_values[k]


# ---- processes ---------------------------------------------------------------------
class Procs:
    """Every subprocess the bench starts; `close()` ends them all (TERM, then KILL)."""

    def __init__(self) -> None:
        self.items: List[subprocess.Popen] = []

    def start(self, argv: List[str], **kw: Any) -> subprocess.Popen:
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        proc = subprocess.Popen(argv, **kw)
        self.items.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(3)
            except subprocess.TimeoutExpired:
                proc.kill()
                try:
                    proc.wait(3)
                except subprocess.TimeoutExpired:
                    pass
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
        if proc in self.items:
            self.items.remove(proc)

    def close(self) -> None:
        for proc in list(self.items):
            self.stop(proc)


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of a child's stdout, with a deadline."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise BenchError("no answer from %s within %g s" % (proc.args[0], timeout))
        return proc.stdout.readline().decode().strip()
    finally:
        sel.close()
