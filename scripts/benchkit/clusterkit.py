"""tcprc servers (with or without [cluster]) and fleets of devices as processes, on
127.0.0.1, for scripts/cluster-bench.

    server = Server(tmp, "s1", ids, base_port, etcd_urls=urls, cluster="b1")
    server.start(); server.ready()          # /metrics answers (and the registry is up)
    server.port("d0000")                     # where device d0000's clients connect here
    fleet = Fleet(cluster_bench, ids, [server.listen, ...], reconnect_max=5)

Every server gets the same [server.devices.ID] tables; each its own range of client
ports (they share 127.0.0.1), so ctl cluster marks their definitions as differing:
that is this bench's doing, not a misconfiguration to copy.
"""

import json
import os
import signal
import subprocess
import sys
import urllib.request
from typing import Any, Dict, List, Optional, Sequence

from .base import REPO, BenchError, free_port, wait_for

DEVICE_SECRET = "cluster-bench-device-0123456789abcdef"
CLUSTER_SECRET = "cluster-bench-secret-0123456789abcdef"


def tcprc_env() -> Dict[str, str]:
    """As deployed: the init script and the units set the two glibc variables."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("MALLOC_ARENA_MAX", "1")
    env.setdefault("GLIBC_TUNABLES", "glibc.pthread.stack_cache_size=0")
    return env


class Server:
    """A `tcprc server` process with devices `ids` on client ports base, base+1, ..."""

    def __init__(self, tmp: str, node: str, ids: Sequence[str], base: int,
                 etcd_urls: Optional[List[str]] = None, cluster: str = "", ttl: int = 10,
                 client_wait: float = 5.0):
        self.node = node
        self.ids = list(ids)
        self.base = base
        self.listen = "127.0.0.1:%d" % free_port()
        self.http = "127.0.0.1:%d" % free_port()
        self.clustered = bool(etcd_urls)
        self.config = os.path.join(tmp, "%s.toml" % node)
        self.log = os.path.join(tmp, "%s.log" % node)
        lines = ['[server]', 'listen = "%s"' % self.listen, 'host = "127.0.0.1:0"',
                 'http = "%s"' % self.http, 'max_pending = 4096', 'max_pending_per_source = 4096',
                 'allow_readable_secrets = true',
                 '[control]', 'socket = "%s"' % os.path.join(tmp, "%s.sock" % node),
                 '[log]', 'level = "warning"']
        if etcd_urls:
            lines += ['[cluster]', 'name = "%s"' % cluster, 'node = "%s"' % node,
                      'etcd = [%s]' % ", ".join('"%s"' % url for url in etcd_urls),
                      'peer_listen = "127.0.0.1:%d"' % free_port(),
                      'secret = "%s"' % CLUSTER_SECRET, 'lease_ttl = %d' % ttl,
                      'client_wait = %g' % client_wait]
        for i, ident in enumerate(self.ids):
            # Distinct ports: host slots are keyed by the host string.
            lines += ['[server.devices.%s]' % ident, 'host = "127.0.0.1:%d"' % (base + i),
                      'secret = "%s"' % DEVICE_SECRET]
        with open(self.config, "w") as handle:
            handle.write("\n".join(lines) + "\n")
        self.proc = None   # type: Optional[subprocess.Popen]

    def port(self, ident: str) -> int:
        return self.base + self.ids.index(ident)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def start(self) -> "Server":
        log = open(self.log, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "tcprc", "server", "-c", self.config],
                                     env=tcprc_env(), stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        return self

    def ready(self, timeout: float = 60) -> "Server":
        def up() -> bool:
            if self.proc.poll() is not None:
                raise BenchError("server %s exited with status %d: %s" % (
                    self.node, self.proc.returncode, self.log_tail()))
            try:
                return self.metric("tcprc_cluster_registry_up") == 1 if self.clustered \
                    else self.metric("tcprc_server_auth_failures_total") is not None
            except OSError:
                return False
        wait_for(up, timeout, "server %s up" % self.node)
        return self

    def get(self, path: str, timeout: float = 30) -> str:
        with urllib.request.urlopen("http://%s%s" % (self.http, path), timeout=timeout) as answer:
            return answer.read().decode()

    def metric(self, name: str) -> Optional[float]:
        for line in self.get("/metrics").splitlines():
            if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
                return float(line.rsplit(" ", 1)[1])
        return None

    def rows(self) -> List[Dict[str, Any]]:
        return json.loads(self.get("/api/devices"))

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log_tail(self, lines: int = 5) -> str:
        try:
            with open(self.log, errors="replace") as handle:
                return " | ".join(handle.read().splitlines()[-lines:])
        except OSError:
            return ""


class Fleet:
    """Devices `ids` as DeviceApps in worker processes (`bench --worker`), each dialing
    `servers` in order, each with an echo service of its worker as target."""

    def __init__(self, bench: str, ids: Sequence[str], servers: Sequence[str], procs: int = 1,
                 reconnect_min: float = 1.0, reconnect_max: float = 5.0,
                 healthy_after: float = 5.0):
        self.workers = []   # type: List[subprocess.Popen]
        ids = list(ids)
        per = -(-len(ids) // max(1, procs))
        for first in range(0, len(ids), per):
            self.workers.append(subprocess.Popen(
                [sys.executable, bench, "--worker", "--ids", ",".join(ids[first:first + per]),
                 "--servers", ",".join(servers), "--reconnect-min", str(reconnect_min),
                 "--reconnect-max", str(reconnect_max), "--healthy-after", str(healthy_after)],
                env=tcprc_env()))

    def stop(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.workers:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def run_worker(ids: Sequence[str], servers: Sequence[str], reconnect_min: float,
               reconnect_max: float, healthy_after: float) -> None:
    """In a worker process: the DeviceApps, until SIGTERM."""
    import logging
    import socket
    import threading
    sys.path.insert(0, REPO)
    threading.stack_size(256 * 1024)   # as `tcprc device` does
    logging.basicConfig(level=logging.ERROR)   # redial lines are the point, not output
    from tcprc.device.app import DeviceApp
    from tcprc.ops.config import build_config
    listener = socket.create_server(("127.0.0.1", 0), backlog=1024)

    def echo(conn: socket.socket) -> None:
        with conn:
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data)

    def accept() -> None:
        while True:
            conn, _ = listener.accept()
            threading.Thread(target=echo, args=(conn,), daemon=True).start()
    threading.Thread(target=accept, daemon=True).start()
    target = "127.0.0.1:%d" % listener.getsockname()[1]
    apps = []
    for ident in ids:
        keys = {"server": list(servers) if len(servers) > 1 else servers[0], "local": target,
                "id": ident, "secret": DEVICE_SECRET, "reconnect_min": reconnect_min,
                "reconnect_max": reconnect_max, "healthy_after": healthy_after}
        apps.append(DeviceApp(build_config("device", {"device": keys}, "bench").device))
        apps[-1].start()
    signal.sigwait([signal.SIGTERM, signal.SIGINT])
    for app in apps:
        app.close()
