"""Cluster: what a server with [cluster] is given (by cli.py) to take part.

    cluster = Cluster(cfg.cluster, cfg.server, deliver)
    cluster.on_claim_lost = ...          # (device_id, node): another node's newer claim
    cluster.start()                      # binds peer_listen (OSError), joins etcd
    token = cluster.claim(device_id, "ADDR:PORT")    # a session authenticated here
    cluster.release(token)                           # ... and ended
    node = cluster.holder(device_id)     # None: this server or nobody; RegistryUnavailable
    node = cluster.wait_for_holder(device_id, cluster.client_wait)   # not_on=NODE: not on it
    cluster.forward(node, device_id, service, client_sock)   # the socket is its now
    cluster.stop()                       # revokes the lease: every claim goes at once

deliver(arrival) is the server's: a client forwarded here by another server,
authenticated; it calls arrival.accept() (-> the socket, now a client of
the device's session) and returns True, or returns False (arrival.refuse(why)
first to say why) and the peer closes its client with that reason.
"""

import logging
import threading
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Tuple

from .. import __version__
from ..settings import ClusterSettings, DeviceEntry, ServerSettings
from .peers import Deliver, PeerListener, PeerRefused, PeerUnreachable, dial_peer
from .records import NodeInfo, devices_digest
from .registry import ClaimToken, Registry, RegistryState
from .splice import Splice, bound_sends

log = logging.getLogger("tcprc")

MAX_FORWARDS = 4096         # forwarded clients at once (two threads each)
DIAL_TIMEOUT = 5.0          # seconds to connect to a peer and finish its handshake

class NodeView(NamedTuple):
    """One server of the cluster, as `tcprc ctl cluster` shows it."""
    name: str
    peer: str
    up: bool             # its node key is in the registry (its lease lives)
    devices: int         # devices it holds
    digest: str          # of its device definitions
    differs: bool        # ... from this server's: the two were given different devices


# on_failure(client_sock, reason, refused): the dial or the handshake failed
# (refused: the holder answered "not here"); return True to keep the socket
# (to wait and forward again), False to have it closed.
OnFailure = Callable[[object, str, bool], bool]


class Cluster:
    """Registry, peer listener and forwarding of one server."""

    def __init__(self, settings: ClusterSettings, server: ServerSettings, deliver: Deliver,
                 devices: Optional[Iterable[DeviceEntry]] = None):
        self.settings = settings
        self.server = server
        self.client_wait = settings.client_wait
        self._secret = settings.secret.reveal()
        me = NodeInfo(settings.node, settings.peer_advertise, server.http, __version__,
                      devices_digest(self._secret, server.devices.values()
                                     if devices is None else devices))
        self.registry = Registry(settings, me)
        self.listener = PeerListener(settings.peer_listen, self._secret, settings.name,
                                     settings.node, deliver, server)
        self._lock = threading.Lock()
        self._splices = []     # type: List[Splice]
        self._forwards = 0     # forward() calls not finished (dialing or carrying)
        self._stopped = False

    def __repr__(self) -> str:
        return "Cluster(%s/%s)" % (self.settings.name, self.settings.node)

    # -- life ---------------------------------------------------------------------

    @property
    def on_claim_lost(self) -> Optional[Callable[[str, str], None]]:
        return self.registry.on_claim_lost

    @on_claim_lost.setter
    def on_claim_lost(self, callback: Optional[Callable[[str, str], None]]) -> None:
        self.registry.on_claim_lost = callback

    def start(self) -> None:
        self.listener.start()
        self.registry.start()
        log.info("cluster %s: node %s, peers on %s, etcd %s", self.settings.name,
                 self.settings.node, self.settings.peer_listen, ", ".join(self.settings.etcd))

    def stop(self) -> None:
        """Leave: release every claim (the lease), stop listening, end forwarded clients."""
        with self._lock:
            self._stopped = True
            splices = list(self._splices)
        self.registry.stop()
        self.listener.stop()
        for splice in splices:
            splice.abort("the server stops")

    # -- the registry -------------------------------------------------------------

    def claim(self, device_id: str, source: str) -> ClaimToken:
        return self.registry.claim(device_id, source)

    def release(self, token: ClaimToken) -> None:
        self.registry.release(token)

    def holder(self, device_id: str) -> Optional[NodeInfo]:
        return self.registry.holder(device_id)

    def wait_for_holder(self, device_id: str, timeout: float,
                        not_on: str = "") -> Optional[NodeInfo]:
        return self.registry.wait_for_holder(device_id, timeout, not_on)

    @property
    def registry_up(self) -> bool:
        return self.registry.registry_up

    def state(self) -> RegistryState:
        return self.registry.state()

    def holders(self) -> Dict[str, str]:
        """Device id -> the node holding its uplink, as this server knows it now."""
        found = {ident: record.node for ident, record in self.registry.cache.devices().items()}
        for ident in self.registry.held_ids():
            found[ident] = self.settings.node
        return found

    def nodes(self) -> List[NodeView]:
        """Every node seen since this server started, sorted by name: the ones in the
        registry now are up, the others' lease has expired."""
        now = self.registry.cache.nodes()
        me = self.registry.me
        held: Dict[str, int] = {}
        for node in self.holders().values():
            held[node] = held.get(node, 0) + 1
        seen = self.registry.cache.seen_nodes()   # the watch remembers the gone ones
        seen[me.name] = me
        return [NodeView(name, info.peer, name in now or name == me.name, held.get(name, 0),
                         info.devices, info.devices != me.devices)
                for name, info in sorted(seen.items())]

    def update_devices(self, devices: Iterable[DeviceEntry]) -> None:
        """The server's device definitions changed (reload, devices_dir): the node key
        says so, for an operator comparing servers."""
        self.registry.update_node(devices=devices_digest(self._secret, devices))

    # -- forwarding ---------------------------------------------------------------

    def connect_peer(self, node: NodeInfo, device_id: str, service: str = "") -> Tuple[object, bytes]:
        """Dial `node` and have it accept a client of `device_id` (blocking, at most
        DIAL_TIMEOUT): (peer socket, bytes already read from it).  PeerRefused or
        PeerUnreachable otherwise."""
        return dial_peer(node, self._secret, self.settings.name, self.settings.node, device_id,
                         service, DIAL_TIMEOUT, self.server)

    def forward(self, node: NodeInfo, device_id: str, service: str, client: object,
                on_failure: Optional[OnFailure] = None) -> None:
        """Carry `client` (a connected socket, now ours) to the holder `node` in a
        worker thread: dial, authenticate, then bytes both ways until both sides
        closed.  On a failed dial or a refusal, on_failure decides; without it the
        client is closed with the reason logged."""
        with self._lock:
            busy = self._stopped or self._forwards >= MAX_FORWARDS
            if not busy:
                self._forwards += 1
        if busy:
            self._give_up(client, device_id, node, "the server stops" if self._stopped else
                          "too many forwarded clients (%d)" % MAX_FORWARDS, False, on_failure,
                          counted=False)
            return
        try:
            threading.Thread(target=self._forward, args=(node, device_id, service, client,
                                                         on_failure),
                             name="cluster-forward", daemon=True).start()
        except RuntimeError as exc:
            self._give_up(client, device_id, node, "cannot start a thread: %s" % exc, False,
                          on_failure)

    def forwarded(self) -> int:
        """Forwarded clients now (dialing or carrying)."""
        with self._lock:
            return self._forwards

    def _forward(self, node: NodeInfo, device_id: str, service: str, client,
                 on_failure: Optional[OnFailure]) -> None:
        try:
            peer, first = self.connect_peer(node, device_id, service)
        except PeerRefused as exc:
            self._give_up(client, device_id, node, "node %s refused: %s" % (node.name, exc),
                          True, on_failure)
            return
        except PeerUnreachable as exc:
            self._give_up(client, device_id, node, str(exc), False, on_failure)
            return
        except Exception:   # fault barrier: this client only
            log.exception("cluster: forwarding a client of device %s failed", device_id)
            self._give_up(client, device_id, node, "internal error", False, None)
            return
        try:
            bound_sends(client, float(self.server.send_timeout))
        except OSError as exc:   # the client went away meanwhile
            peer.close()
            self._give_up(client, device_id, node, exc.strerror or str(exc), False, None)
            return
        name = "%s->%s" % (device_id, node.name)

        def done(up: int, down: int, error: str) -> None:
            with self._lock:
                self._splices.remove(splice)
                self._forwards -= 1
            log.info("cluster: forwarded client of device %s via node %s closed (%d bytes up, "
                     "%d down%s)", device_id, node.name, up, down, ", " + error if error else "")

        splice = Splice(client, peer, name, done)
        with self._lock:
            self._splices.append(splice)
            stopped = self._stopped
        if stopped:
            splice.abort("the server stops")
        log.info("cluster: client of device %s%s forwarded to node %s", device_id,
                 " service " + service if service else "", node.name)
        splice.run(first)

    def _give_up(self, client, device_id: str, node: NodeInfo, reason: str, refused: bool,
                 on_failure: Optional[OnFailure], counted: bool = True) -> None:
        if counted:
            with self._lock:
                self._forwards -= 1
        kept = False
        if on_failure is not None:
            try:
                kept = bool(on_failure(client, reason, refused))
            except Exception:   # fault barrier
                log.exception("cluster: on_failure for a client of device %s failed", device_id)
        if kept:
            return
        log.info("cluster: client of device %s closed: forwarding to node %s failed: %s",
                 device_id, node.name, reason)
        try:
            client.close()
        except OSError:
            pass
