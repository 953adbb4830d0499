"""The report: machine facts, metrics, ratios, the text table."""

import datetime
import os
import platform
import subprocess
from typing import Any, Dict

from .variants import LABELS


def machine(python: str) -> Dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "date": datetime.datetime.utcnow().strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.machine(), "cpu": cpu, "cores": os.cpu_count(),
        "kernel": platform.release(), "python": _python_version(python),
    }


def _python_version(python: str) -> str:
    try:
        out = subprocess.run([python, "-c", "import platform; print(platform.python_version())"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, timeout=30)
        return out.stdout.decode().strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# metric key, label, unit format, higher is better
METRICS = [
    ("tput_1_gbps", "throughput 1 stream (Gbit/s)", "%.2f", True),
    ("tput_4_gbps", "throughput 4 streams (Gbit/s)", "%.2f", True),
    ("tput_1_rev_gbps", "throughput 1 stream, reverse (Gbit/s)", "%.2f", True),
    ("latency_p50_us", "latency p50, 64 B ping-pong (us)", "%.0f", False),
    ("latency_p99_us", "latency p99 (us)", "%.0f", False),
    ("conn_per_s", "new connections per second", "%.0f", True),
    ("device_cpu_s_per_gb", "device CPU seconds per GB", "%.2f", False),
    ("device_rss_idle_kb", "device RSS idle (KB)", "%.0f", False),
    ("interpreter_rss_kb", "  of which its Python alone (KB)", "%.0f", False),
    ("device_rss_idle_id_kb", "device RSS idle, with an id and secret (KB)", "%.0f", False),
    ("device_rss_busy_kb", "device RSS, N streams open (KB)", "%.0f", False),
    ("device_rss_per_stream_kb", "device RSS per open stream (KB)", "%.1f", False),
    ("device_rss_after_kb", "device RSS after they closed (KB)", "%.0f", False),
    ("device_rss_after2_kb", "device RSS after a 2nd round (KB)", "%.0f", False),
    ("device_rss_bulk_kb", "device RSS after the bulk tests (KB)", "%.0f", False),
    ("device_threads_idle", "device threads idle", "%d", False),
    ("device_threads_busy", "device threads, N streams open", "%d", False),
    ("device_threads_after", "device threads after they closed", "%d", False),
    ("tls_handshake_ms", "TLS handshake, with TCP connect (ms)", "%.2f", False),
    ("tls_version", "  TLS version", "%s", True),
    ("tput_4dl_gbps", "4 downloads, built-in generator (Gbit/s)", "%.2f", True),
    ("tput_4dl_paused_gbps", "the same, a 5th client paused (Gbit/s)", "%.2f", True),
    ("paused_ratio", "  paused / not paused", "%.2f", True),
    ("paused_max_gap_s", "  longest stop of all 4 (s)", "%.2f", False),
    ("paused_completed", "  paused client complete after it read", "%s", True),
]


def ratios(results: Dict[str, Dict[str, Any]], subject: str, base: str) -> Dict[str, float]:
    a, b = results.get(subject) or {}, results.get(base) or {}
    out = {}
    for key, _, _, _ in METRICS:
        if isinstance(a.get(key), (int, float)) and isinstance(b.get(key), (int, float)) and b[key]:
            out[key] = a[key] / b[key]
    return out


def fmt(value: Any, form: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return form % value


def table(report: Dict[str, Any]) -> str:
    results, names = report["results"], report["ran"]
    streams = report["settings"]["streams"]
    heads = ["metric"] + [LABELS[n] for n in names]
    compare = [("tcprc", "tcprc-legacy", "v2 / legacy"), ("tcprc-tls", "ssh", "TLS / ssh -R"),
               ("tcprc-tls", "tcprc", "TLS / plain v2"),
               ("tcprc", "ssh", "tcprc / ssh -R"), ("tcprc", "direct", "tcprc / direct"),
               ("tcprc", "socat", "tcprc / socat"), ("tcprc-splice", "tcprc", "splice / tcprc"),
               ("tcprc", "baseline", "tcprc / baseline")]
    compare = [c for c in compare if c[0] in names and c[1] in names]
    heads += [c[2] for c in compare]
    rows = []
    for key, label, form, _ in METRICS:
        if not any(key in (results.get(n) or {}) for n in names):
            continue
        row = [label.replace("N streams", "%d streams" % streams)]
        row += [fmt((results.get(n) or {}).get(key), form) for n in names]
        for subject, base, _ in compare:
            r = report["ratios"].get("%s/%s" % (subject, base), {}).get(key)
            row.append("-" if r is None else "%.2fx" % r)
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [heads]) for i in range(len(heads))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                                         for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    out = [line(heads), "|" + "|".join(("-" * (w + 1) + ":") if i else ("-" * (w + 2))
                                     for i, w in enumerate(widths)) + "|"]
    out += [line(r) for r in rows]
    return "\n".join(out)


def render(report: Dict[str, Any]) -> str:
    m = report["machine"]
    s = report["settings"]
    lines = ["tcprc benchmark, %s, %s (%s, %d cores), Linux %s, tcprc on Python %s" % (
        m["date"], m["machine"], m["cpu"], m["cores"] or 0, m["kernel"], m["python"]),
        "bulk traffic: %s, %g s per test in %d turns; %d ping-pong rounds; %g s of connections; "
        "%d streams; the variants take turns" % (report["bulk_tool"], s["seconds"], s["reps"],
                                                s["rounds"], s["conn_seconds"], s["streams"]),
        report.get("deployment", ""), ""]
    lines.append(table(report))
    for name, why in report["skipped"].items():
        lines.append("skipped %s: %s" % (LABELS[name], why))
    if report["targets"]:
        lines += ["", "targets (tcprc):"]
        for t in report["targets"]:
            lines.append("  %-4s %-40s %s (limit %s)" % (
                "ok" if t["ok"] else "MISS", t["target"], t["value"], t["limit"]))
    return "\n".join(lines)
