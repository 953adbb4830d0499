"""`scripts/bench`: arguments, one run of every variant, the report."""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from typing import Any, Dict, List, Optional

from .base import REPO, BenchError, Procs, note
from .install import INSTALLS, describe
from .footprint import render_breakdown, run_breakdown
from .measure import conn_rate, echo_ready, idle_rss, latency, memory, paused, throughput, tls_handshake
from .procfs import sample
from .report import machine, ratios, render
from .services import Services, serve
from .targets import targets
from .variants import EXTRA, LABELS, VARIANTS, Direct, Socat, SshR, Tcprc, Tunnel


def run_all(variants: Dict[str, Any], procs: Procs, services: Services, opts: argparse.Namespace,
            report: Dict[str, Any]) -> None:
    """Open every variant's tunnels, then measure them side by side."""
    echo: Dict[str, Tunnel] = {}
    bulk: Dict[str, Tunnel] = {}
    gen: Dict[str, Tunnel] = {}      # to the built-in generator: the paused-client row
    results: Dict[str, Dict[str, Any]] = report["results"]

    def failed(name: str, exc: Exception) -> None:
        note("%s failed: %s" % (LABELS[name], exc))
        report["errors"][name] = str(exc)
        results.pop(name, None)
        echo.pop(name, None)
        bulk.pop(name, None)
        gen.pop(name, None)

    for name, variant in variants.items():
        note("starting %s" % LABELS[name])
        try:
            echo[name] = variant.open(procs, services.echo_port)
            echo_ready(echo[name].entry)
            bulk[name] = variant.open(procs, services.bulk_port)
            if getattr(variant, "paused_row", False):
                gen[name] = variant.open(procs, services.gen_port)
            results[name] = {}
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            failed(name, exc)
    for name in list(echo):
        if echo[name].device:
            note("memory of %s with %d streams" % (LABELS[name], opts.streams))
            try:
                results[name].update(memory(echo[name].entry, echo[name].device, opts.streams,
                                            0.1 if opts.quick else 0.5))
                if hasattr(variants[name], "interpreter_rss_kb"):
                    results[name]["interpreter_rss_kb"] = variants[name].interpreter_rss_kb()
            except (BenchError, OSError) as exc:
                failed(name, exc)
    for name in list(echo):
        if name in ("tcprc", "tcprc-tls"):
            # As deployed: an id and a secret load libcrypto, with TLS or without.
            note("idle memory of %s with an id and a secret" % LABELS[name])
            tunnel = None
            try:
                tunnel = variants[name].open(procs, services.echo_port, identity=True)
                results[name]["device_rss_idle_id_kb"] = idle_rss(tunnel.entry, tunnel.device,
                                                                   0.1 if opts.quick else 0.5)
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                note("%s with an id: %s" % (LABELS[name], exc))
            finally:
                if tunnel is not None:
                    tunnel.close()
    for name in list(echo):
        if getattr(variants[name], "tls_ca", ""):
            note("TLS handshakes of %s" % LABELS[name])
            try:
                results[name].update(tls_handshake(opts.python, echo[name].uplink, variants[name].tls_ca,
                                                   5 if opts.quick else 50))
            except BenchError as exc:
                failed(name, exc)
    note("latency")
    for name, r in latency({n: t.entry for n, t in echo.items()}, opts.rounds, failed).items():
        results[name].update(r)
    note("connections per second")
    for name, r in conn_rate({n: t.entry for n, t in echo.items()}, opts.conn_seconds).items():
        results[name].update(r)
    note("throughput")
    for name, r in throughput(services, dict(bulk), opts.seconds, opts.reps, failed).items():
        results[name].update(r)
        if bulk[name].device:
            results[name]["device_rss_bulk_kb"] = sample(bulk[name].device)["rss_kb"]
    if gen:
        note("4 downloads while a fifth client is paused")
        for name, r in paused(dict(gen), 4, opts.seconds, opts.reps, failed).items():
            results[name].update(r)
    report["ran"] = [n for n in variants if n in results]


def parse_args(argv: Optional[List[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="tcprc vs direct, socat and ssh -R on 127.0.0.1")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
    p.add_argument("--only", metavar="LIST", help="comma-separated subset of: " + ",".join(VARIANTS + EXTRA))
    p.add_argument("--seconds", type=float, help="seconds per throughput test and variant (default 6)")
    p.add_argument("--reps", type=int, help="runs those seconds are split into, variants taking turns "
                                           "(default 3)")
    p.add_argument("--rounds", type=int, help="ping-pong round trips (default 5000)")
    p.add_argument("--conn-seconds", type=float, help="seconds of connection churn (default 3)")
    p.add_argument("--streams", type=int, help="open streams for the memory test (default 200)")
    p.add_argument("--no-iperf3", action="store_true", help="use the built-in generator")
    p.add_argument("--baseline", metavar="DIR",
                   help="another tcprc checkout (say, a git worktree of an older commit) "
                        "measured side by side as 'baseline'")
    p.add_argument("--python", metavar="PATH", default=sys.executable,
                   help="interpreter that runs tcprc (default: this one)")
    p.add_argument("--install", choices=INSTALLS, default="venv",
                   help="venv (default): tcprc as README's install runs it, in a venv of its own; "
                        "pythonpath: as earlier runs did, the checkout on PYTHONPATH of --python "
                        "with that interpreter's site-packages")
    p.add_argument("--breakdown", action="store_true",
                   help="only where an idle device's RSS goes (smaps), plain, with an id, "
                        "with TLS and an id (of the --baseline checkout, if given)")
    p.add_argument("--serve", choices=("echo", "gen"), help=argparse.SUPPRESS)
    opts = p.parse_args(argv)
    quick = opts.quick
    # iperf3 counts whole seconds; the built-in generator takes fractions.
    short = 0.3 if opts.no_iperf3 or not shutil.which("iperf3") else 1.0
    for key, full, small in (("seconds", 6.0, short), ("reps", 3, 1), ("rounds", 5000, 200),
                             ("conn_seconds", 3.0, 0.5), ("streams", 200, 20)):
        if getattr(opts, key) is None:
            setattr(opts, key, small if quick else full)
        elif getattr(opts, key) <= 0:
            p.error("--%s must be positive" % key.replace("_", "-"))
    return opts


def deployment(opts: argparse.Namespace) -> str:
    return describe(opts.install, Tcprc(opts.python, install=opts.install).env)


def main_breakdown(opts: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    procs = Procs()
    try:
        report = {"machine": machine(opts.python), "deployment": deployment(opts),
                  "breakdown": run_breakdown(opts, procs, Services(procs, False))}
    finally:
        procs.close()
    if opts.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        m = report["machine"]
        print("tcprc idle device RSS by part, %s, %s (%s), Linux %s, Python %s, tcprc from %s\n%s\n" % (
            m["date"], m["machine"], m["cpu"], m["kernel"], m["python"], opts.baseline or REPO,
            report["deployment"]))
        print(render_breakdown(report["breakdown"]))
    return 0 if len(report["breakdown"]) == 3 else 1


def main(argv: Optional[List[str]] = None) -> int:
    opts = parse_args(argv)
    if opts.serve:
        return serve(opts.serve)
    if opts.breakdown:
        return main_breakdown(opts)
    names = list(VARIANTS)
    if opts.only:
        names = [n.strip() for n in opts.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in VARIANTS + EXTRA]
        if unknown:
            print("bench: unknown variant %s (choose from %s)" % (", ".join(unknown), ", ".join(VARIANTS + EXTRA)),
                  file=sys.stderr)
            return 2
    use_iperf3 = bool(shutil.which("iperf3")) and not opts.no_iperf3
    if not use_iperf3 and not opts.no_iperf3:
        note("iperf3 is not installed: using the built-in generator")
    # SIGTERM ends us through the finally blocks, so no child outlives the bench.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    how = {"install": opts.install}
    makers = {"direct": Direct, "socat": Socat, "ssh": SshR, "tcprc": lambda: Tcprc(opts.python, **how),
              "tcprc-legacy": lambda: Tcprc(opts.python, device_args=["--protocol", "legacy"], **how),
              "tcprc-tls": lambda: Tcprc(opts.python, tls=True, **how),
              "tcprc-splice": lambda: Tcprc(opts.python, {"TCPRC_SPLICE": "1"}, **how),
              "baseline": lambda: Tcprc(opts.python, repo=os.path.abspath(opts.baseline or REPO), **how)}
    if opts.baseline and "baseline" not in names:
        names.append("baseline")
    report: Dict[str, Any] = {
        "machine": machine(opts.python), "deployment": deployment(opts), "bulk_tool": "iperf3" if use_iperf3 else "built-in generator",
        "settings": {k: getattr(opts, k) for k in ("seconds", "reps", "rounds", "conn_seconds", "streams")},
        "ran": [], "skipped": {}, "errors": {}, "results": {},
    }
    procs = Procs()
    try:
        services = Services(procs, use_iperf3)
        variants = {}
        for name in names:
            variant = makers[name]()
            why = variant.missing()
            if why:
                note("skipping %s: %s" % (LABELS[name], why))
                report["skipped"][name] = why
            else:
                variants[name] = variant
        try:
            run_all(variants, procs, services, opts, report)
        finally:
            for variant in variants.values():
                variant.close()
    finally:
        procs.close()
    report["ratios"] = {"%s/%s" % (a, b): ratios(report["results"], a, b)
                        for a in report["ran"] for b in report["ran"] if a != b}
    report["targets"] = targets(report["results"], opts.streams)
    if opts.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(render(report))
    return 1 if report["errors"] else 0
