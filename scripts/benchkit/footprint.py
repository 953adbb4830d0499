"""`scripts/bench --breakdown`: where an idle tcprc device's RSS goes, part by part,
for a plain device, one with an id and a secret, and one with TLS and an id."""

import os
import signal
import time
from typing import Any, Dict, List

from .base import REPO, BenchError, Procs, note, wait_for
from .measure import idle_rss
from .services import Services
from .smaps import breakdown, read_smaps, stack_pointers
from .variants import Tcprc

SETUPS = (("plain", "plain v2", {}, False), ("id", "with an id", {}, True),
          ("tls-id", "TLS, with an id", {"tls": True}, True))


def _mallocstats(path: str, pid: int) -> str:
    """Ask the device for pymalloc's statistics (SIGUSR1) and wait for them."""
    with open(path) as f:
        f.seek(0, os.SEEK_END)
        start = f.tell()
    os.kill(pid, signal.SIGUSR1)

    def text() -> str:
        with open(path) as f:
            f.seek(start)
            return f.read()
    wait_for(lambda: "bytes in allocated blocks" in text() and "Total" in text().split(
        "bytes in allocated blocks", 1)[1], 10, "the device's malloc statistics")
    time.sleep(0.1)   # the rest of the report
    return text()


def run_breakdown(opts: Any, procs: Procs, services: Services) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    repo = os.path.abspath(opts.baseline) if opts.baseline else REPO   # --baseline: that checkout's
    for key, label, kwargs, identity in SETUPS:
        variant = Tcprc(opts.python, repo=repo, install=opts.install, **kwargs)
        try:
            why = variant.missing()
            if why:
                note("skipping %s: %s" % (label, why))
                continue
            tunnel = variant.open(procs, services.echo_port, identity=identity, mallocstats=True)
            try:
                vm = idle_rss(tunnel.entry, tunnel.device, 0.5)
                # Sampled before the statistics are asked for: writing them touches memory.
                maps, stacks = read_smaps(tunnel.device), stack_pointers(tunnel.device)
                stats = _mallocstats(tunnel.device_err, tunnel.device)
                parts = breakdown(maps, stacks, opts.python, stats)
                parts["vmrss_kb"] = vm
                parts["label"] = label
                out[key] = parts
            finally:
                tunnel.close()
        except (BenchError, OSError) as exc:
            note("%s: %s" % (label, exc))
        finally:
            variant.close()
    return out


def render_breakdown(report: Dict[str, Any]) -> str:
    keys = [k for k, _, _, _ in SETUPS if k in report]
    if not keys:
        return "no tcprc device measured"
    names: List[str] = []
    for k in keys:
        for name in report[k]["parts"]:
            if name not in names:
                names.append(name)
    order = sorted(names, key=lambda n: -max(report[k]["parts"].get(n, {}).get("rss_kb", 0) for k in keys))
    heads = ["part of the idle device's RSS (KB)"] + [report[k]["label"] for k in keys] + \
        ["private, %s" % report[k]["label"] for k in keys]
    rows = []
    for name in order:
        cells = [name]
        for field in ("rss_kb", "private_kb"):
            for k in keys:
                part = report[k]["parts"].get(name)
                cells.append("%d" % part[field] if part else "-")
        rows.append(cells)
    rows.append(["sum of the parts"] + ["%d" % report[k]["total_rss_kb"] for k in keys] +
                ["%d" % report[k]["total_private_kb"] for k in keys])
    rows.append(["VmRSS, sampled just before"] + ["%d" % report[k]["vmrss_kb"] for k in keys] +
                ["" for k in keys])
    # The process's own count (not a part of the sum): how much of the anonymous
    # memory is its Python objects.
    for field, label in (("arena_bytes", "pymalloc arenas (the process's count)"),
                         ("allocated_bytes", "  live Python objects in them")):
        if all(field in (report[k].get("pymalloc") or {}) for k in keys):
            rows.append([label] + ["%d" % (report[k]["pymalloc"][field] // 1024) for k in keys] +
                        ["" for k in keys])
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                         for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(heads), "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                                     for i, w in enumerate(widths)) + "|"]
    return "\n".join(out + [line(r) for r in rows])
