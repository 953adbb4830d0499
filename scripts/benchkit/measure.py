"""The measurements: latency, connection rate, memory and threads, throughput."""

import fcntl
import json
import select
import socket
import struct
import subprocess
import termios
import threading
import time
from typing import Any, Callable, Dict, List, Tuple

from .base import LOCAL, BenchError, percentile, recv_exact, wait_for
from .procfs import sample
from .services import GEN_HEAD, Services
from .variants import Tunnel


def connect(port: int) -> socket.socket:
    sock = socket.create_connection((LOCAL, port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def echo_ready(port: int, timeout: float = 10) -> None:
    """One round trip through the whole path (the entry may listen before the far end is up)."""
    def attempt() -> bool:
        try:
            with connect(port) as s:
                s.settimeout(2)
                s.sendall(b"ready?")
                return recv_exact(s, 6) == b"ready?"
        except (OSError, BenchError):
            return False
    wait_for(attempt, timeout, "a round trip through port %d" % port, interval=0.1)


def latency(entries: Dict[str, int], rounds: int, failed: Callable[[str, Exception], None]) -> Dict[str, Dict[str, float]]:
    """64-byte ping-pong, one connection per variant, microseconds.

    The variants take turns round trip by round trip, so a burst of load
    from elsewhere on the machine hits all of them alike, and the turn order
    rotates, so none always runs right after the same other one.
    """
    msg = b"x" * 64
    conns = {}
    for name, port in entries.items():
        try:
            conns[name] = connect(port)
        except OSError as exc:
            failed(name, exc)
    times: Dict[str, List[float]] = {name: [] for name in conns}
    warmup = rounds // 10
    try:
        for i in range(rounds + warmup):
            order = list(conns.items())
            shift = i % max(1, len(order))
            for name, s in order[shift:] + order[:shift]:
                try:
                    t0 = time.perf_counter()
                    s.sendall(msg)
                    recv_exact(s, 64)
                except (OSError, BenchError) as exc:
                    failed(name, exc)
                    conns.pop(name).close()
                    continue
                if i >= warmup:
                    times[name].append((time.perf_counter() - t0) * 1e6)
    finally:
        for s in conns.values():
            s.close()
    out = {}
    for name in conns:
        times[name].sort()
        out[name] = {"latency_p50_us": percentile(times[name], 50),
                     "latency_p99_us": percentile(times[name], 99)}
    return out


def conn_rate(entries: Dict[str, int], seconds: float) -> Dict[str, Dict[str, float]]:
    """Sequential connect, one 64-byte round trip, close; variants take turns in short slices."""
    msg = b"y" * 64
    tally = {name: [0, 0, 0.0] for name in entries}   # done, errors, seconds
    slice_s = min(0.25, seconds)
    while any(t[2] < seconds and t[1] <= 50 for t in tally.values()):
        for name, port in entries.items():
            t = tally[name]
            if t[2] >= seconds or t[1] > 50:
                continue
            t0 = time.perf_counter()
            end = t0 + slice_s
            while time.perf_counter() < end:
                try:
                    with connect(port) as s:
                        s.sendall(msg)
                        recv_exact(s, 64)
                    t[0] += 1
                except (OSError, BenchError):
                    t[1] += 1
                    if t[1] > 50:
                        break
            t[2] += time.perf_counter() - t0
    return {name: {"conn_per_s": t[0] / t[2], "conn_errors": t[1]} for name, t in tally.items()}


def memory(port: int, pid: int, streams: int, settle: float = 0.5) -> Dict[str, float]:
    """The device's RSS and threads: idle, with `streams` open, and after they closed.

    The streams open and close twice: the first round may leave a one-time
    high-water mark (cached thread stacks, allocator arenas); what a second
    round adds is what would grow without bound.
    """
    start = sample(pid)
    echo_ready(port)   # one stream opened and closed: lazy allocations happen here
    wait_for(lambda: sample(pid)["threads"] <= start["threads"], 10, "the warm-up stream to end")
    time.sleep(settle / 2)
    idle = sample(pid)
    busy, after = [], []
    for _ in range(2):
        socks = []
        try:
            for _ in range(streams):
                socks.append(connect(port))
            for s in socks:   # a round trip each: the far end has really opened its side
                s.sendall(b"z" * 64)
            for s in socks:
                recv_exact(s, 64)
            busy.append(sample(pid))
        finally:
            for s in socks:
                s.close()
        wait_for(lambda: sample(pid)["threads"] <= idle["threads"], 15,
                 "the device's threads to go back to the idle count")
        time.sleep(settle)   # let the freeing finish before sampling
        after.append(sample(pid))
    return {
        "device_rss_start_kb": start["rss_kb"],
        "device_rss_idle_kb": idle["rss_kb"],
        "device_rss_busy_kb": busy[0]["rss_kb"],
        "device_rss_after_kb": after[0]["rss_kb"],
        "device_rss_after2_kb": after[1]["rss_kb"],
        "device_rss_per_stream_kb": (busy[0]["rss_kb"] - idle["rss_kb"]) / float(streams),
        "device_threads_idle": idle["threads"],
        "device_threads_busy": busy[0]["threads"],
        "device_threads_after": max(a["threads"] for a in after),
    }


def idle_rss(port: int, pid: int, settle: float = 0.5) -> float:
    """The device's RSS once idle, sampled as memory() samples it (KB)."""
    start = sample(pid)
    echo_ready(port)
    wait_for(lambda: sample(pid)["threads"] <= start["threads"], 10, "the warm-up stream to end")
    time.sleep(settle / 2)
    return sample(pid)["rss_kb"]


def iperf3(port: int, streams: int, seconds: float, reverse: bool) -> Tuple[float, int]:
    argv = ["iperf3", "-c", LOCAL, "-p", str(port), "-t", str(max(1, int(round(seconds)))),
            "-P", str(streams), "-J", "--connect-timeout", "5000"] + (["-R"] if reverse else [])
    for attempt in range(10):
        try:
            out = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 timeout=seconds + 30).stdout
        except subprocess.TimeoutExpired:
            raise BenchError("iperf3 client timed out")
        try:
            result = json.loads(out.decode())
        except ValueError:
            raise BenchError("iperf3 printed no JSON")
        # iperf3 -s takes a moment to tidy up after a test; until then it is "busy".
        if "busy" not in str(result.get("error", "")):
            break
        time.sleep(0.3)
    if result.get("error"):
        raise BenchError("iperf3: %s" % result["error"])
    received = result["end"]["sum_received"]
    return received["bits_per_second"], int(received["bytes"])


def generator(port: int, streams: int, seconds: float, reverse: bool) -> Tuple[float, int]:
    """Built-in stand-in for iperf3: `streams` connections sending for `seconds`."""

    def one(i: int) -> Tuple[int, float]:
        with socket.create_connection((LOCAL, port), timeout=seconds + 20) as s:
            s.sendall(GEN_HEAD.pack(b"R" if reverse else b"S", seconds))
            buf = bytearray(256 * 1024)
            t0 = time.perf_counter()
            if reverse:
                total = 0
                while True:
                    n = s.recv_into(buf)
                    if not n:
                        break
                    total += n
            else:
                # Send until the sink answers how much it took in its time window.
                end = t0 + seconds + 20
                while not select.select([s], [], [], 0)[0]:
                    if time.perf_counter() > end:
                        raise BenchError("the sink never answered")
                    s.sendall(buf)
                total, elapsed = struct.unpack("!Qd", recv_exact(s, 16))
                return total, elapsed
            return total, time.perf_counter() - t0

    results = _in_threads(one, streams, seconds + 30, "generator")
    total = sum(r[0] for r in results)
    return total * 8 / max(r[1] for r in results), total


BULK_TESTS = (("tput_1_gbps", 1, False), ("tput_4_gbps", 4, False), ("tput_1_rev_gbps", 1, True))


def throughput(services: Services, tunnels: Dict[str, Tunnel], seconds: float, reps: int,
               failed: Callable[[str, Exception], None]) -> Dict[str, Dict[str, Any]]:
    """Each test `reps` times per variant, the variants taking turns; totals over the runs.

    The device's CPU is sampled around its own runs only (the others idle then).
    """
    run = iperf3 if services.iperf3 else generator
    per_run = seconds / reps
    moved = {name: [0, 0.0] for name in tunnels}                  # bytes, device CPU s
    totals = {name: {key: [0, 0.0, []] for key, _, _ in BULK_TESTS} for name in tunnels}
    for _ in range(reps):
        for key, streams, reverse in BULK_TESTS:
            for name, tunnel in tunnels.items():
                if name not in moved:
                    continue
                before = sample(tunnel.device) if tunnel.device else None
                try:
                    bps, nbytes = run(tunnel.entry, streams, per_run, reverse)
                except BenchError as exc:
                    failed(name, BenchError("%s (%s, %d streams%s)%s" % (
                        exc, key, streams, ", reverse" if reverse else "", tunnel.log_tail())))
                    del moved[name]
                    if services.iperf3:
                        services.restart_iperf3()
                    continue
                if before is not None:
                    moved[name][1] += sample(tunnel.device)["cpu_s"] - before["cpu_s"]
                moved[name][0] += nbytes
                t = totals[name][key]
                t[0] += nbytes
                t[1] += nbytes * 8 / bps
                t[2].append(round(bps / 1e9, 3))
    out: Dict[str, Dict[str, Any]] = {}
    for name in moved:
        r: Dict[str, Any] = {}
        for key, (nbytes, secs, runs) in totals[name].items():
            r[key] = nbytes * 8 / secs / 1e9
            r[key + "_runs"] = runs
        if tunnels[name].device:
            r["device_cpu_s_per_gb"] = moved[name][1] / (moved[name][0] / 1e9)
        out[name] = r
    return out


def downloads(port: int, streams: int, seconds: float) -> Tuple[float, int, float]:
    """`streams` clients downloading from the generator for `seconds`:
    (bits/s, bytes, the longest time in which none of them received a byte)."""
    stamps: List[List[float]] = [[] for _ in range(streams)]
    t0 = time.perf_counter()

    def one(i: int) -> Tuple[int, float]:
        with socket.create_connection((LOCAL, port), timeout=seconds + 30) as s:
            s.sendall(GEN_HEAD.pack(b"R", seconds))
            buf = bytearray(256 * 1024)
            total, times = 0, stamps[i]
            while True:
                n = s.recv_into(buf)
                if not n:
                    break
                total += n
                times.append(time.perf_counter())
            return total, time.perf_counter() - t0

    results = _in_threads(one, streams, seconds + 40, "download")
    times = sorted([t0] + [t for ts in stamps for t in ts])
    gap = max(b - a for a, b in zip(times, times[1:])) if len(times) > 1 else 0.0
    total = sum(r[0] for r in results)
    return total * 8 / max(r[1] for r in results), total, gap


def _in_threads(one: Callable[[int], Tuple[int, float]], count: int, timeout: float,
                what: str) -> List[Tuple[int, float]]:
    """one(0) .. one(count - 1) at once, a thread each: their (bytes, seconds),
    or BenchError naming the first that failed or did not end within `timeout`."""
    results: List[Any] = [None] * count

    def run(i: int) -> None:
        try:
            results[i] = one(i)
        except (OSError, BenchError) as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    for r in results:
        if not isinstance(r, tuple):
            raise BenchError("%s stream failed: %s" % (what, r or "timed out"))
    return results


def _queued(sock: socket.socket) -> int:
    """Bytes waiting in the socket's receive queue (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


def paused_client(port: int, size: int) -> socket.socket:
    """A client that asked for `size` bytes and reads none: returned once its
    receive queue has filled and stopped growing (the tunnel holds the rest)."""
    sock = connect(port)
    sock.sendall(GEN_HEAD.pack(b"N", size))
    seen = [-1, time.monotonic()]

    def still() -> bool:
        now, queued = time.monotonic(), _queued(sock)
        if queued != seen[0]:
            seen[:] = [queued, now]
        return queued > 0 and now - seen[1] >= 0.2
    try:
        wait_for(still, 15, "the paused client's receive queue to fill")
    except BenchError:
        sock.close()
        raise
    return sock


def resume(sock: socket.socket, size: int, timeout: float) -> Tuple[int, str]:
    """Read the paused client's download to its end: (bytes, how it ended)."""
    sock.settimeout(timeout)
    buf = bytearray(1 << 20)
    got = 0
    try:
        while True:
            n = sock.recv_into(buf)
            if not n:
                return got, "eof"
            got += n
    except socket.timeout:
        return got, "timed out"
    except OSError as exc:
        return got, "reset" if isinstance(exc, ConnectionResetError) else str(exc)
    finally:
        sock.close()


PAUSED_SIZE = 64 << 20   # beyond every socket buffer and window on the way


def paused(tunnels: Dict[str, Tunnel], streams: int, seconds: float, reps: int,
           failed: Callable[[str, Exception], None]) -> Dict[str, Dict[str, Any]]:
    """`streams` downloads with and without a paused client on the same tunnel.

    The tunnels lead to the built-in generator.  Each rep runs the downloads
    alone, then with a fifth client that asked for PAUSED_SIZE bytes and reads
    nothing; afterwards that client reads its download to the end, which says
    whether the tunnel kept it (all bytes, EOF) or cut it.
    """
    per_run = seconds / reps
    out: Dict[str, Dict[str, Any]] = {}
    for name, tunnel in tunnels.items():
        sums = {"alone": [0, 0.0], "paused": [0, 0.0]}
        gaps, fates = [], []
        try:
            for _ in range(reps):
                bps, nbytes, _ = downloads(tunnel.entry, streams, per_run)
                sums["alone"][0] += nbytes
                sums["alone"][1] += nbytes * 8 / bps
                sock = paused_client(tunnel.entry, PAUSED_SIZE)
                try:
                    bps, nbytes, gap = downloads(tunnel.entry, streams, per_run)
                finally:
                    got, how = resume(sock, PAUSED_SIZE, 30)
                sums["paused"][0] += nbytes
                sums["paused"][1] += nbytes * 8 / bps
                gaps.append(gap)
                fates.append((got, how))
        except BenchError as exc:
            failed(name, BenchError("%s (paused client test)%s" % (exc, tunnel.log_tail())))
            continue
        alone = sums["alone"][0] * 8 / sums["alone"][1] / 1e9
        with_paused = sums["paused"][0] * 8 / sums["paused"][1] / 1e9
        kept = sum(1 for got, how in fates if got == PAUSED_SIZE and how == "eof")
        worst = min(fates)
        out[name] = {
            "tput_4dl_gbps": alone, "tput_4dl_paused_gbps": with_paused,
            "paused_ratio": with_paused / alone if alone else 0.0,
            "paused_max_gap_s": max(gaps),
            "paused_completed": "%d of %d" % (kept, len(fates)) if kept == len(fates) else
            "%d of %d (cut: %.1f of %d MB, %s)" % (kept, len(fates), worst[0] / 2.0 ** 20,
                                                  PAUSED_SIZE >> 20, worst[1]),
        }
    return out


# Run by the interpreter that runs tcprc: its ssl module is the device's.
_HANDSHAKES = r"""
import socket, ssl, sys, time
port, ca, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
context.minimum_version = ssl.TLSVersion.TLSv1_2
times = []
for _ in range(count):
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            times.append(time.perf_counter() - t0)
            version = tls.version()
times.sort()
print(times[len(times) // 2] * 1e3, version)
"""


def tls_handshake(python: str, port: int, ca: str, count: int) -> Dict[str, Any]:
    """Median time of a TCP connect plus TLS handshake with the server's uplink
    port, verifying its certificate as the device does (then closed, no LISTEN)."""
    try:
        out = subprocess.run([python, "-c", _HANDSHAKES, str(port), ca, str(count)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    except subprocess.TimeoutExpired:
        raise BenchError("the TLS handshakes timed out")
    if out.returncode != 0:
        raise BenchError("TLS handshake failed: %s" % out.stderr.decode().strip()[-300:])
    ms, version = out.stdout.decode().split()
    return {"tls_handshake_ms": float(ms), "tls_version": version}
