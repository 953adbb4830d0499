"""A tcprc cluster as real processes: `tcprc server` processes with [cluster]
(each on a loopback address of its own, 127.0.R.k, as three machines would
have one each: the same ports, only the addresses differ), sharing an etcd
(support.etcd), and `tcprc device` processes with a list of servers.

    rig = Rig(agents, etcd.urls)            # nodes s1 s2 s3, devices gw1 gw2 gw3 configured
    s1 = rig.server("s1")                   # started; rig.servers() starts them all
    rig.device("gw1", ["s1", "s2"])         # its list, in that order
    rig.wait_held("gw1", "s1")              # every server's /api/devices says so
    sock = rig.connect("s2", "gw1")         # a client on s2's port of gw1
"""

import json
import random
import socket
import subprocess
import time
import urllib.request
import uuid
from typing import Any, Dict, List, Optional, Sequence

from .agents import Agents, run_tcprc
from .net import free_port
from .waiting import wait_for

CLUSTER_SECRET = "cluster-e2e-secret-0123456789abcdef"
DEVICE_SECRET = "device-e2e-secret-0123456789abcdef"
NODES = ("s1", "s2", "s3", "s4")


class Node:
    """One `tcprc server` process of the rig."""

    def __init__(self, rig: "Rig", name: str, address: str):
        self.rig, self.name, self.address = rig, name, address
        self.proc: Any = None

    def addr(self, port: int) -> str:
        return "%s:%d" % (self.address, port)

    @property
    def listen(self) -> str:
        return self.addr(self.rig.ports["listen"])

    @property
    def peer(self) -> str:
        return self.addr(self.rig.ports["peer"])

    def url(self, path: str) -> str:
        return "http://%s%s" % (self.addr(self.rig.ports["http"]), path)

    def get(self, path: str, timeout: float = 5.0) -> str:
        with urllib.request.urlopen(self.url(path), timeout=timeout) as answer:
            return answer.read().decode()

    def rows(self) -> Dict[str, Dict[str, Any]]:
        """/api/devices, by id."""
        return {row["id"]: row for row in json.loads(self.get("/api/devices"))}

    def metric(self, name: str) -> Optional[float]:
        """The value of /metrics' sample `name` (with its labels, if it has any:
        'tcprc_cluster_fights_total{device="gw1"}'), or None."""
        for line in self.get("/metrics").splitlines():
            if not line.startswith("#") and line.rsplit(" ", 1)[0] == name:
                return float(line.rsplit(" ", 1)[1])
        return None

    def ctl(self, *args: str) -> subprocess.CompletedProcess:
        return run_tcprc("ctl", "--role", "server", "--socket", self.proc.control_socket, *args)

    def log(self) -> str:
        return Agents.log(self.proc)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def terminate(self) -> None:
        self.proc.terminate()
        self.proc.wait(20)


class Rig:
    """Servers s1..s4 (started on demand) of one cluster, their devices, an etcd."""

    def __init__(self, agents: Agents, etcd_urls: List[str], target: Any,
                 devices: Sequence[str] = ("gw1", "gw2", "gw3"), ttl: int = 2,
                 client_wait: float = 5.0, server_keys: str = ""):
        self.agents, self.etcd_urls, self.target = agents, list(etcd_urls), target
        self.name = "e" + uuid.uuid4().hex[:8]   # tests may share an etcd: a prefix each
        self.ttl, self.client_wait, self.server_keys = ttl, client_wait, server_keys
        block = random.randrange(10, 250)        # 127.0.block.k: away from etcd's 127.0.1.x
        self.nodes = {name: Node(self, name, "127.0.%d.%d" % (block, k + 1))
                      for k, name in enumerate(NODES)}
        addresses = [node.address for node in self.nodes.values()]
        self.ports = {what: free_port(*addresses) for what in ("listen", "peer", "http")}
        self.ports.update({ident: free_port(*addresses) for ident in devices})
        self.device_ids = list(devices)
        self.devices: Dict[str, Any] = {}

    # -- servers --------------------------------------------------------------------
    def server_config(self, node: Node, secret: str = CLUSTER_SECRET,
                      etcd: Optional[List[str]] = None) -> str:
        text = ['[server]', 'listen = "%s"' % node.listen, 'host = "%s"' % node.addr(0),
                'http = "%s"' % node.addr(self.ports["http"]),
                'allow_readable_secrets = true', 'max_pending_per_source = 64',
                self.server_keys,
                '[cluster]', 'name = "%s"' % self.name, 'node = "%s"' % node.name,
                'etcd = [%s]' % ", ".join('"%s"' % url for url in (etcd or self.etcd_urls)),
                'peer_listen = "%s"' % node.peer, 'secret = "%s"' % secret,
                'lease_ttl = %d' % self.ttl, 'client_wait = %g' % self.client_wait]
        for ident in self.device_ids:
            text += ['[server.devices.%s]' % ident, 'host = "%s"' % node.addr(self.ports[ident]),
                     'secret = "%s"' % DEVICE_SECRET]
        return "\n".join(text) + "\n"

    def server(self, name: str, secret: str = CLUSTER_SECRET,
               etcd: Optional[List[str]] = None) -> Node:
        """Start server `name` (again, after a kill); returns once it serves its ports
        and its node key is in the registry."""
        node = self.nodes[name]
        node.proc = self.agents.start("server", config=self.server_config(node, secret, etcd))
        wait_for(lambda: self._up(node) or not node.alive, 20, "server %s up" % name)
        assert node.alive, node.log()
        return node

    def _up(self, node: Node) -> bool:
        try:
            return node.metric("tcprc_cluster_registry_up") == 1
        except OSError:
            return False

    def servers(self, names: Sequence[str] = ("s1", "s2", "s3")) -> List[Node]:
        procs = []
        for name in names:   # all at once: a process's start-up overlaps the next one's
            node = self.nodes[name]
            node.proc = self.agents.start("server", config=self.server_config(node))
            procs.append(node)
        for node in procs:
            wait_for(lambda: self._up(node) or not node.alive, 20, "server %s up" % node.name)
            assert node.alive, node.log()
        return procs

    def live(self) -> List[Node]:
        return [node for node in self.nodes.values() if node.alive]

    # -- devices --------------------------------------------------------------------
    def device(self, ident: str, servers: Sequence[str], **keys: Any) -> Any:
        """A `tcprc device` process with id `ident` and the listed servers (names of
        nodes, or ADDR:PORT strings, e.g. a relay's) in that order."""
        listed = [self.nodes[s].listen if s in self.nodes else s for s in servers]
        values = {"local": "%s:%d" % self.target, "id": ident, "secret": DEVICE_SECRET,
                  "allow_readable_secrets": True, "reconnect_min": 0.2, "reconnect_max": 1.0,
                  "connect_timeout": 2.0}
        values.update(keys)
        text = ['[device]', 'server = [%s]' % ", ".join('"%s"' % s for s in listed)]
        for key, value in values.items():
            text.append("%s = %s" % (key, json.dumps(value)))   # JSON scalars are TOML here
        proc = self.agents.start("device", config="\n".join(text) + "\n")
        self.devices.setdefault(ident, []).append(proc)
        return proc

    def holder(self, node: Node, ident: str) -> Optional[str]:
        """The node `node`'s /api/devices names for `ident`."""
        return node.rows()[ident]["node"]

    def wait_held(self, ident: str, name: str, timeout: float = 15.0,
                  nodes: Optional[Sequence[Node]] = None) -> None:
        """`ident`'s session is up on `name`, and every live server (or `nodes`) knows it."""
        nodes = list(nodes) if nodes is not None else self.live()

        def held() -> bool:
            try:
                return self.nodes[name].rows()[ident]["state"] == "up" and \
                    all(self.holder(node, ident) == name for node in nodes)
            except OSError:
                return False
        wait_for(held, timeout, "device %s held by %s, as every server knows" % (ident, name),
                 interval=0.05)

    def address(self, name: str, ident: str) -> Any:
        return self.nodes[name].address, self.ports[ident]

    def connect(self, name: str, ident: str, timeout: float = 10.0) -> socket.socket:
        return socket.create_connection(self.address(name, ident), timeout=timeout)

    def echoes(self, name: str, ident: str, data: bytes = b"ping", timeout: float = 3.0) -> bool:
        """A client on server `name`'s port of `ident` gets `data` back from the echo
        service behind the device (support.streams' header first)."""
        from .streams import HEADER
        try:
            with self.connect(name, ident, timeout) as sock:
                sock.sendall(HEADER.pack(b"e", len(data)) + data)
                got = b""
                while len(got) < len(data):
                    chunk = sock.recv(len(data) - len(got))
                    if not chunk:
                        return False
                    got += chunk
                return got == data
        except OSError:
            return False

    def reached_from(self, ident: str, names: Sequence[str]) -> bool:
        return all(self.echoes(name, ident) for name in names)

    def wait_reached(self, ident: str, names: Sequence[str], timeout: float = 15.0) -> float:
        """Seconds until a client on every one of `names` reaches `ident`."""
        started = time.monotonic()
        wait_for(lambda: self.reached_from(ident, names), timeout,
                 "device %s reached through %s" % (ident, ", ".join(names)), interval=0.05)
        return time.monotonic() - started

    # -- etcd, read directly ------------------------------------------------------------
    def registry(self) -> Dict[str, Any]:
        """What etcd holds for this cluster now: {"nodes": [names], "devices": {id: node}}."""
        from tcprc.cluster.etcd import EtcdClient, parse_endpoint, prefix_end
        from tcprc.cluster.records import Keys, decode_claim
        keys = Keys(self.name)
        client = EtcdClient([parse_endpoint(url) for url in self.etcd_urls], 2.0)
        try:
            kvs, _ = client.range(keys.prefix, prefix_end(keys.prefix))
        finally:
            client.close()
        found: Dict[str, Any] = {"nodes": [], "devices": {}}
        for kv in kvs:
            kind, name = keys.parse(kv.key)
            if kind == "node":
                found["nodes"].append(name)
            else:
                found["devices"][name] = decode_claim(name, kv.value, kv.mod_revision,
                                                      kv.lease).node
        return found
