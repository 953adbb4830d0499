"""ServerApp: accept device uplinks, open their host ports, carry clients.

Each host port carries one tunnel at a time: [server] host for legacy
sessions (the legacy LISTEN names no port) and v2 sessions without
identity, and each `[server.devices.ID]` its own `host`, for the sessions
that authenticated as that id and nobody else.
When a second session claims a host port that belongs to a live uplink,
the newcomer takes over by default: a device that lost its uplink without
the server noticing (a dead cellular NAT mapping) reconnects at once
instead of being locked out until TCP gives up, the classic `ssh -R`
"remote port forwarding failed" trap.  `takeover = false` refuses the
newcomer instead.

The legacy protocol has no authentication: whoever reaches the uplink port
can LISTEN.  `allow_from` limits who may dial in; connections waiting for
their LISTEN are capped per source and overall, and the one waiting longest
makes room for a newcomer (a real device LISTENs within milliseconds), so a
flood of idle connections cannot lock a device out.  Every line about the
uplink port is rate-limited per source.
"""


import logging
import socket
import threading
import time
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Set, Tuple

from ..addr import address_in, format_hostport, parse_hostport, parse_network, source_key
from ..errors import TcprcError
from ..engine.ratelog import LimitedLog, SourceLog
from ..engine.liveness import TICK, Liveness
from ..engine.loop import Loop
from ..engine.sockets import accept_nowait, bind_for
from .auth import Auth
from .fleet import Fleet
from .link import LinkParts, ServerLink, open_server_link
from .ports import Ports, drop_colliding, service_owner
from ..settings import ServerSettings

log = logging.getLogger("tcprc.server")

HostPort = Tuple[str, int]

SCAN_LIMIT = 300.0   # seconds a devices_dir scan may take before the server counts as stuck
MAX_WAITING = 256    # clients held at once while their device moves between servers


def server_tls(settings: ServerSettings) -> Any:
    """The TLS context [server] asks for, or None; ConfigError on unusable files."""
    if not settings.tls_cert:
        return None
    from ..engine.tls import server_context
    return server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca or None)


class ServerApp:
    """The server agent: an acceptor loop in its own thread takes uplinks; each
    ServerLink runs in a thread of its own; one of them holds the host port.

    Public methods (start, close, apply_settings, status, devices, kick) are
    thread-safe.  What links need of the server they get as narrow objects
    (server.link.LinkParts): the ports (server.ports), the fleet's devices and
    records (server.fleet), the handshakes' outcome (server.auth).
    """

    SCAN_INTERVAL = 5.0   # seconds between looks at devices_dir (a stat per file)

    def __init__(self, settings: ServerSettings, device_files: Optional[Callable[[str], Any]] = None):
        """`device_files(path)`: what reads [server] devices_dir (ops.devdir.DeviceFiles;
        the wiring passes it in: the server layer does not parse config files)."""
        self.settings = settings
        self.listen_address: Optional[HostPort] = None
        self._lock = threading.Lock()   # the links and the pending ones
        self._links: Set[ServerLink] = set()
        self.liveness = Liveness()
        self._loop = Loop(on_error=self._acceptor_error)
        self._acceptor_errors = LimitedLog(log, interval=10.0)
        self.uplinks_refused = 0   # no thread could start for them
        self._started = 0.0
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._last_error = ""
        self._pending: Dict[ServerLink, None] = {}   # waiting for LISTEN, oldest first
        self._allow = [parse_network(n) for n in settings.allow_from]
        self.uplink_log = SourceLog(log)
        self._accept_errors = LimitedLog(log)
        self._tls = server_tls(settings)   # ConfigError here: the start stops
        self.fleet = Fleet(settings.devices, settings.host)   # [server.devices] + devices_dir
        self.ports = Ports(self.uplink_log, lambda: self.settings.takeover, self._standby)
        self.auth = Auth(self.fleet, self.uplink_log, bool(settings.tls_client_ca))
        self.link_parts = LinkParts(self.ports, self.fleet, self.auth, self.uplink_log,
                                    self._established)
        self.cluster: Any = None          # with [cluster]: see use_cluster
        self._standby_fds: Dict[str, int] = {}   # acceptor thread: ports kept open -> fd
        self._waiting = 0                 # clients waiting for their device to appear
        self._device_files = device_files
        self._dir: Any = None
        self._dir_path = ""
        self._from_files: Dict[str, Any] = {}
        self._scan_lock = threading.Lock()   # one scan at a time (scanner, SIGHUP)
        self._scanner: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._http: Any = None
        self.scans = 0   # periodic scans done (tests wait on it)
        self._open_dir(settings, force=True)

    @property
    def host_address(self) -> Optional[HostPort]:
        """Where [server] host accepts clients, while a session holds it."""
        return self.ports.address("")

    @property
    def http_address(self) -> Optional[HostPort]:
        """Where [server] http serves the status page, once started."""
        return self._http.address if self._http is not None else None

    @property
    def auth_failures(self) -> int:
        return self.auth.failures

    @property
    def client_certificates(self) -> bool:
        return self.auth.client_certificates

    def link_on(self, device_id: str = "") -> Optional[ServerLink]:
        """The uplink that holds `device_id`'s host port ([server] host by default)."""
        return self.ports.holder(device_id)

    def device_host_address(self, device_id: str) -> Optional[HostPort]:
        """Where a configured device's clients are accepted, while its session is up."""
        return self.ports.address(device_id) if device_id else None

    def service_address(self, device_id: str, name: str) -> Optional[HostPort]:
        """Where clients of a device's service `name` are accepted, while its session is up."""
        return self.ports.address(service_owner(device_id, name)) if device_id else None

    def host_for(self, device_id: str) -> str:
        return self.fleet.host_for(device_id)

    def services_of(self, device_id: str) -> Mapping[str, str]:
        """A configured device's named services: name -> host."""
        return self.fleet.services_of(device_id)

    # ---- the cluster ---------------------------------------------------------------
    def use_cluster(self, cluster: Any) -> None:
        """Before start(): take part in a cluster (tcprc.cluster.Cluster, built by the
        wiring: this layer does not import it).  Every configured device's ports
        stay open here; a client of a device another server holds is forwarded
        there (cluster.forward), one whose device is nowhere waits up to
        client_wait for it; sessions with an id are claimed in the registry, and a
        claim another server overwrites makes this one PING its uplink."""
        self.cluster = cluster
        self.link_parts = self.link_parts._replace(cluster=cluster)
        cluster.on_claim_lost = self._claim_lost

    def deliver(self, arrival: Any) -> bool:
        """Peer thread: a client another server forwarded here (its peer authenticated):
        a client of the device's session here, or refused with the reason."""
        link = self.ports.holder(arrival.device_id)
        if link is None or not link.listening:
            arrival.refuse("device %s has no session on this node" % arrival.device_id)
            return False
        if arrival.service and arrival.service not in self.fleet.services_of(arrival.device_id):
            arrival.refuse("device %s has no service %s" % (arrival.device_id, arrival.service))
            return False
        try:
            client = arrival.accept()
        except OSError:
            return False
        who = "%s via node %s" % (arrival.source, arrival.peer_node)
        link.loop.call_soon(lambda: link.adopt(client, who, arrival.service))
        return True

    def _claim_lost(self, device_id: str, node: str) -> None:
        """Registry thread: node `node` claimed `device_id`, whose session is here."""
        link = self.ports.holder(device_id)
        if link is not None:
            link.loop.call_soon(lambda: link.check_taken_over(node))

    def _keep_device_ports(self) -> None:
        """A cluster's server keeps every configured device's ports open."""
        if self.cluster is None:
            return
        wanted: Dict[str, str] = {}
        for ident, entry in self.fleet.devices.items():
            wanted[ident] = entry.host
            for name, host in entry.services.items():
                wanted[service_owner(ident, name)] = host
        self.ports.keep_open(wanted)

    def _standby(self, owner: str, sock: Optional[socket.socket]) -> None:
        """Any thread: a port kept open with nobody here serving it (`sock`), or
        taken by a session or closed (None): the acceptor watches it or not."""
        self._loop.call_soon(lambda: self._watch_standby(owner, sock))

    def _watch_standby(self, owner: str, sock: Optional[socket.socket]) -> None:
        fd = self._standby_fds.pop(owner, None)
        if fd is not None:
            self._loop.forget_fd(fd)
        if sock is not None and sock.fileno() >= 0 and self.ports.holder(owner) is None:
            self._standby_fds[owner] = sock.fileno()
            self._loop.set_handlers(sock, lambda: self._standby_accept(owner, sock), None)

    def _standby_accept(self, owner: str, listener: socket.socket) -> None:
        """Acceptor thread: a client on a device's port that no session here serves."""
        try:
            accepted = accept_nowait(listener)
        except OSError as exc:
            self._accept_errors.warning("accept on %s's port failed: %s", owner,
                                        exc.strerror or exc)
            return
        if accepted is not None:
            device_id, _, service = owner.partition("/")
            self._route(device_id, service, accepted[0], format_hostport(*accepted[1][:2]))

    def _route(self, device_id: str, service: str, client: socket.socket, who: str,
               waited: bool = False) -> None:
        """A client of `device_id` to the session that serves it: here, on the node that
        holds it (forwarded), or, while nobody holds it, after a wait."""
        link = self.ports.holder(device_id)
        if link is not None and link.listening:
            link.loop.call_soon(lambda: link.adopt(client, who, service))
            return
        try:
            node = self.cluster.holder(device_id)
        except TcprcError as exc:
            self._refuse_routed(client, device_id, who, str(exc))
            return
        if node is not None and not node.local:
            self._forward(node, device_id, service, client, who, waited)
        elif waited:
            self._refuse_routed(client, device_id, who, "no server holds it (waited %g s)"
                                % self.cluster.client_wait)
        else:
            self._wait_for(device_id, service, client, who)

    def _forward(self, node: Any, device_id: str, service: str, client: socket.socket,
                 who: str, waited: bool) -> None:
        self.fleet.forwarded(device_id)

        def failed(sock: Any, reason: str, refused: bool) -> bool:
            # The device moved meanwhile (refused), or its server died before its
            # claim expired: once, the client waits for where the device goes next,
            # not for that node's claim, which may stay until its lease ends.
            if waited:
                return False
            self._wait_for(device_id, service, sock, who, not_on=node.name)
            return True
        self.cluster.forward(node, device_id, service, client, failed)

    def _wait_for(self, device_id: str, service: str, client: socket.socket, who: str,
                  not_on: str = "") -> None:
        """Hold a client up to client_wait while its device moves between servers (or
        comes back), in a thread of its own; bounded in number.  `not_on`: the node
        that just failed this client does not count as the device's holder."""
        with self._lock:
            busy = self._waiting >= MAX_WAITING
            if not busy:
                self._waiting += 1
        if busy:
            self._refuse_routed(client, device_id, who, "%d clients wait for their devices "
                                "already" % MAX_WAITING)
            return

        def wait() -> None:
            try:
                self.cluster.wait_for_holder(device_id, self.cluster.client_wait, not_on)
                self._route(device_id, service, client, who, waited=True)
            except Exception as exc:   # the waiter's fault barrier: this client only
                log.error("internal error while a client of device %s waited: %s: %s",
                          device_id, type(exc).__name__, exc, exc_info=exc)
                client.close()
            finally:
                with self._lock:
                    self._waiting -= 1
        try:
            threading.Thread(target=wait, name="tcprc-wait", daemon=True).start()
        except (RuntimeError, MemoryError) as exc:
            with self._lock:
                self._waiting -= 1
            self._refuse_routed(client, device_id, who, "cannot start a thread: %s" % exc)

    def _refuse_routed(self, client: socket.socket, device_id: str, who: str,
                       why: str) -> None:
        client.close()
        self.uplink_log.warning(source_key(who.rsplit(":", 1)[0]),
                                "client %s of device %s closed: %s", who, device_id, why)

    # ---- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Bind the uplink port (errors raise OSError here, at start) and serve it."""
        self._listener = bind_for("device uplinks ([server] listen)", self.settings.listen)
        self._started = time.monotonic()
        self.listen_address = self._listener.getsockname()[:2]
        self._loop.set_handlers(self._listener, self._accept_uplink, None)
        self._thread = threading.Thread(target=self._loop.run, name="tcprc-server", daemon=True)
        self.liveness.watch("tcprc-server (uplink acceptor)", self._thread)
        self._loop.every(TICK, lambda: self.liveness.beat("tcprc-server (uplink acceptor)"))
        self._thread.start()
        log.info("waiting for devices on %s", format_hostport(*self.listen_address))
        self._warn_if_open()
        self._check_device_ports()
        if self.cluster is not None:
            try:
                self.cluster.start()
            except OSError as exc:
                raise OSError(exc.errno, "cannot listen for the cluster's servers ([cluster] "
                              "peer_listen) on %s: %s" % (self.cluster.settings.peer_listen,
                                                          exc.strerror or exc)) from None
            self._keep_device_ports()
        self._start_scanner()
        if self.settings.http:
            from . import http
            self._http = http.start(self, self.settings)   # OSError: the start stops

    def _log_tls_change(self, was_tls: bool, settings: ServerSettings) -> None:
        live = "; live sessions keep the transport they started with until they redial"
        if self._tls is None:
            log.warning("[server] TLS is off now: new uplinks on %s are plaintext%s",
                        settings.listen, live)
        elif not was_tls:
            log.info("[server] TLS is on now: new uplinks on %s speak TLS with %s%s",
                     settings.listen, settings.tls_cert, live)
        else:
            log.info("[server] TLS: new uplinks get the certificate %s%s%s", settings.tls_cert,
                     " and need a device certificate of %s" % settings.tls_client_ca
                     if settings.tls_client_ca else "", live)

    def _check_device_ports(self) -> None:
        """Every configured device's host and service ports can be opened now: a
        port another program holds is one WARNING at start and at SIGHUP, not a
        surprise when the device connects."""
        held = self.ports.held()
        for ident, entry in sorted(self.fleet.devices.items()):
            ports = [(ident, "its host", entry.host)] + [
                ("%s/%s" % (ident, name), "its service %s" % name, host)
                for name, host in sorted(entry.services.items())]
            for owner, what, host in ports:
                if owner in held or parse_hostport(host, allow_empty_host=True,
                                                   allow_zero_port=True)[1] == 0:
                    continue
                try:
                    bind_for("device %s (%s)" % (ident, what), host).close()
                except OSError as exc:
                    log.warning("%s; its clients will be refused until it is free",
                                exc.strerror or exc)

    def _warn_if_open(self) -> None:
        """A warning while it is true: legacy sessions allowed (they have no
        authentication), from anywhere."""
        if not self.settings.legacy:
            return
        wide = [n for n, (_, _, prefix) in zip(self.settings.allow_from, self._allow) if prefix == 0]
        if wide:
            log.warning("legacy uplinks are accepted from anywhere (allow_from %s): the legacy "
                        "protocol has no authentication, whoever reaches %s can take the tunnel "
                        "and its clients; narrow [server] allow_from or firewall the port",
                        ", ".join(wide), format_hostport(*self.listen_address))

    def _acceptor_error(self, exc: BaseException) -> None:
        """The acceptor's fault barrier: a bug in one of its callbacks is logged
        (with its traceback, at most every 10 s) and the acceptor goes on."""
        self._acceptor_errors.error("internal error in the uplink acceptor (it carries on): "
                                    "%s: %s", type(exc).__name__, exc, exc_info=exc)

    def health(self) -> List[str]:
        """What keeps this server from serving: a critical thread ended or stuck."""
        return self.liveness.problems()

    def close(self) -> None:
        if self.cluster is not None:   # first: the claims go at once, not at lease expiry
            self.cluster.stop()
        self._stopping.set()
        self.liveness.forget("tcprc-server (uplink acceptor)")
        self.liveness.forget("tcprc-scan (devices_dir)")
        if self._http is not None:
            self._http.close()
        self._loop.call_soon(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
        if self._scanner is not None:
            self._scanner.join(5)
        if self._listener is not None:
            self._listener.close()
        self._loop.close()
        with self._lock:
            links = list(self._links)
        for link in links:
            link.stop("server stopping")
        for link in links:
            link.wait_stopped(5)
        self.ports.close_all()   # what a cluster kept open

    def apply_settings(self, settings: ServerSettings) -> None:
        """New settings (SIGHUP, config set). The listen port stays where it is until a
        restart (ops reports that, with what else waits for one: keys.SERVER_KEYS)."""
        changed = settings.host != self.settings.host or settings.connect_port != self.settings.connect_port \
            or settings.connect_address != self.settings.connect_address
        allow_changed = settings.allow_from != self.settings.allow_from or \
            settings.legacy != self.settings.legacy
        tls_changed = (settings.tls_cert, settings.tls_key, settings.tls_client_ca) != \
            (self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca)
        if tls_changed:   # a rotated certificate: new uplinks get it, live ones keep theirs
            was_tls, self._tls = self._tls is not None, server_tls(settings)
            self.auth.client_certificates = bool(settings.tls_client_ca)
            self._log_tls_change(was_tls, settings)
        self.settings = settings
        if self._thread is not None and (settings.http or self._http is not None):
            from . import http   # [server] http and its keys apply live
            self._http = http.follow(self._http, self, settings)
        self._open_dir(settings, force=True)   # SIGHUP: every device file read again
        if self._thread is not None:
            self._start_scanner()   # a devices_dir named for the first time
            self._check_device_ports()
        if allow_changed:
            self._allow = [parse_network(n) for n in settings.allow_from]
            self._warn_if_open()
            with self._lock:
                links = list(self._links)
            for link in links:
                if not address_in(link.host, self._allow):
                    link.stop("source no longer in allow_from")
        if changed:
            active = self.ports.holder("")
            if active is not None:
                active.stop("settings changed")

    def status(self) -> Dict[str, Any]:
        """The server as a whole: its listeners, its sessions and devices, totals.
        One device's session is `device ID` / `devices`, never this."""
        links = self.ports.sessions()
        up, down = self.fleet.totals
        clients = 0
        protocols, transports = set(), set()
        for link in links:
            stats = link.stats()
            up += stats["bytes_received"]
            down += stats["bytes_sent"]
            clients += stats["clients"]
            protocols.add(stats["protocol"])
            transports.add(stats["tls"])
        configured, devices_up = self.fleet.counts()
        http, shared = self.http_address, self.host_address
        return {
            "state": "up" if links else "waiting",
            "listen": format_hostport(*self.listen_address) if self.listen_address else "",
            "host": format_hostport(*shared) if shared else "",
            "http": format_hostport(*http) if http else "",
            # What the live sessions speak ("legacy, v2" when they differ).
            "protocol": ", ".join(sorted(protocols)),
            "tls": ", ".join(sorted(transports)) if transports else ("on" if self._tls else "off"),
            "legacy": "allowed" if self.settings.legacy else "refused",
            "devices": "%d up of %d configured" % (devices_up, configured),
            "sessions": len(links),
            "clients": clients,
            "bytes_up": up,
            "bytes_down": down,
            "uptime": time.monotonic() - self._started if self._started else None,
            "auth_failures": self.auth_failures,
            "uplinks_refused": self.uplinks_refused,
            "last_error": self._last_error,
            "health": "; ".join(self.liveness.problems()) or "ok",
            **self._cluster_status(),
        }

    def cluster_view(self) -> Any:
        """(nodes, [(device id, node, since)]) of the cluster, or None without one."""
        if self.cluster is None:
            return None
        claims = self.cluster.registry.cache.devices()
        mine = {ident: link for ident in self.cluster.registry.held_ids()
                for link in [self.ports.holder(ident)] if link is not None}
        devices = sorted((ident, record.node, record.since) for ident, record in claims.items()
                         if ident not in mine)
        devices += [(ident, self.cluster.settings.node,
                     link.record.since if link.record is not None else None)
                    for ident, link in mine.items()]
        return self.cluster.nodes(), sorted(devices)

    def cluster_metrics(self) -> Optional[Dict[str, int]]:
        """The cluster's gauges for /metrics, or None without a cluster."""
        if self.cluster is None:
            return None
        state = self.cluster.state()
        return {"nodes_up": state.nodes, "registry_up": int(state.up)}

    def _cluster_status(self) -> Dict[str, Any]:
        if self.cluster is None:
            return {}
        state = self.cluster.state()
        return {"cluster": "%s, node %s: registry %s (%s), %d node(s) up, %d device(s) held "
                           "here, %d client(s) forwarded now"
                           % (self.cluster.settings.name, self.cluster.settings.node,
                              state.state, state.detail, state.nodes, state.claims,
                              self.cluster.forwarded())}

    # ---- the fleet --------------------------------------------------------------------
    def _open_dir(self, settings: ServerSettings, force: bool) -> None:
        """[server] devices_dir read (again), merged with [server.devices]."""
        with self._scan_lock:
            if settings.devices_dir != self._dir_path:
                self._dir_path = settings.devices_dir
                self._dir = None
                if settings.devices_dir and self._device_files is None:
                    log.warning("devices_dir %s is not read: this server was built without a "
                                "reader for device files", settings.devices_dir)
                elif settings.devices_dir:
                    self._dir = self._device_files(settings.devices_dir)
                self._from_files = {}
            if self._dir is not None:
                found = self._dir.scan(force)
                if found is not None:
                    self._from_files = found
            self._set_devices(settings)

    def _start_scanner(self) -> None:
        """The devices_dir scanner, in a thread of its own: a file system that is
        slow or a file that blocks never holds up the uplink acceptor."""
        if self._scanner is not None or not self._dir_path or self._stopping.is_set():
            return
        self._scanner = threading.Thread(target=self._scan_forever, name="tcprc-scan", daemon=True)
        self.liveness.watch("tcprc-scan (devices_dir)", self._scanner, limit=SCAN_LIMIT)
        self._scanner.start()

    def _scan_forever(self) -> None:
        """Every SCAN_INTERVAL: files added, edited or removed."""
        while not self._stopping.wait(self.SCAN_INTERVAL):
            try:
                if self._dir is not None:
                    with self._scan_lock:
                        found = self._dir.scan(False)
                        if found is not None:
                            self._from_files = found
                            self._set_devices(self.settings)
            except Exception as exc:   # the scanner's fault barrier: the next scan comes
                log.error("internal error in the devices_dir scan (it carries on): %s: %s",
                          type(exc).__name__, exc, exc_info=exc)
            self.scans += 1
            self.liveness.beat("tcprc-scan (devices_dir)")

    def _set_devices(self, settings: ServerSettings) -> None:
        """Under the scan lock: the merged devices take effect; a removed or changed
        device's session ends (a removed one's port is released; a changed one redials),
        unless only its services changed: then its service ports follow, live."""
        merged = dict(self._from_files)
        for ident in settings.devices:
            if ident in merged:
                log.warning("device %s is in [server.devices] and in devices_dir: the "
                            "configuration file's table is used", ident)
        merged.update(settings.devices)
        drop_colliding(merged, settings)
        devices = MappingProxyType(merged)
        old = self.fleet.set_devices(devices, settings.host)
        if self.cluster is not None:
            self.cluster.update_devices(devices.values())
            if self._thread is not None:
                self._keep_device_ports()
        with self._lock:
            links = list(self._links)
        for link in links:
            ident = link.device_id
            before, after = old.get(ident), devices.get(ident)
            if ident and before is not None and after is not None and before != after \
                    and before._replace(services=after.services) == after:
                link.loop.call_soon(link.sync_services)   # only its services changed
            elif ident and before != after:
                reason = "device %s %s the configuration" % (
                    ident, "changed in" if ident in devices else "removed from")
                log.info("%s: its session (%s) is closed", reason, link.name)
                link.stop(reason)

    def devices(self) -> List[Dict[str, Any]]:
        """The device table: every configured device, then the session on [server] host
        (id ":legacy") while it is up; in a cluster, the node holding each.  Thread-safe."""
        rows = self.fleet.rows(self.ports)
        if self.cluster is not None:
            holders = self.cluster.holders()
            for row in rows:
                row["node"] = holders.get(row["id"])
        return rows

    def kick(self, device_id: str) -> bool:
        """End a device's session (it may redial); False when it has none."""
        link = self.fleet.link_of(device_id)
        if link is None:
            return False
        log.info("device %s: session closed by the operator (kick)", device_id)
        link.stop("kicked by the operator")
        return True

    # ---- uplinks ------------------------------------------------------------------
    def _accept_uplink(self) -> None:
        try:
            accepted = accept_nowait(self._listener)
        except OSError as exc:
            self._accept_errors.warning("accept on the uplink port failed: %s", exc.strerror or exc)
            return
        if accepted is None:
            return
        sock, peer = accepted
        who = format_hostport(*peer[:2])
        if not address_in(peer[0], self._allow):
            sock.close()
            self.uplink_log.warning(source_key(peer[0]), "uplink from %s refused: not in allow_from", who)
            return
        try:
            link = open_server_link(sock, self.settings, "uplink %s" % who, self.link_parts,
                                    peer[0], self._tls)
        except OSError as exc:
            sock.close()
            self._accept_errors.warning("uplink from %s: setup failed: %s", who, exc.strerror or exc)
            return
        except BaseException:
            sock.close()   # the acceptor's barrier logs it; this uplink goes, nothing else
            raise
        try:
            started = self._start_uplink(link)
        except BaseException:
            started = False
            raise
        finally:
            if not started:   # its descriptors go now, and it is nobody's to serve
                with self._lock:
                    self._links.discard(link)
                    self._pending.pop(link, None)
                link.discard()
        if started:
            self.uplink_log.info(link.source, "uplink from %s accepted", who)

    def _start_uplink(self, link: ServerLink) -> bool:
        """Make room for `link` among the waiting uplinks and start its thread;
        False (logged, counted) when no thread could start for it."""
        thread = threading.Thread(target=self._serve, args=(link,), name="tcprc-uplink", daemon=True)
        with self._lock:
            victims = self._make_room(link.source)
            self._links.add(link)
            self._pending[link] = None
        for victim, reason in victims:
            victim.evict(reason)
        try:
            thread.start()
        except (RuntimeError, MemoryError) as exc:   # a thread limit (TasksMax, ulimit -u)
            with self._lock:
                self.uplinks_refused += 1
            self._accept_errors.warning("%s refused: cannot start its thread: %s", link.name, exc)
            return False
        return True

    def _make_room(self, source: Any) -> List[Tuple[ServerLink, str]]:
        """Under the lock: the waiting uplinks to drop so one more may wait.

        The one waiting longest goes, never the newcomer: a device sends LISTEN
        at once, so an old waiter is the least likely to be one.  Over the
        per-source cap, the source's own oldest goes (a device behind the same
        NAT still gets in), one whose CHALLENGE the throttle holds before any
        other; over the global cap, the oldest of all.
        """
        victims = []
        mine = [link for link in self._pending if link.source == source]
        # Handshakes the throttle holds go first: a failing neighbour's retries
        # never push out a good device's handshake from the same address.
        mine.sort(key=lambda link: not link.held_by_throttle)
        while len(mine) >= self.settings.max_pending_per_source:
            victims.append((mine.pop(0), "dropped for a newer connection from the same source "
                            "(max_pending_per_source = %d)" % self.settings.max_pending_per_source))
            del self._pending[victims[-1][0]]
        while len(self._pending) >= self.settings.max_pending:
            oldest = next(iter(self._pending))
            victims.append((oldest, "dropped for a newer connection (max_pending = %d)"
                            % self.settings.max_pending))
            del self._pending[oldest]
        return victims

    def _established(self, link: ServerLink) -> None:
        """Link thread: its session is established: it no longer waits."""
        with self._lock:
            self._pending.pop(link, None)

    def _serve(self, link: ServerLink) -> None:
        try:
            if link.transport.buffers and not self._handshake(link):
                link.discard()   # its loop's descriptors too, not at garbage collection
                return
            link.run()
        finally:
            with self._lock:
                self._links.discard(link)
                self._pending.pop(link, None)
                if link.listening and link.end_reason:
                    self._last_error = "%s: %s" % (link.name, link.end_reason)
            self.fleet.session_ended(link)

    def _handshake(self, link: ServerLink) -> bool:
        """The TLS handshake, in the link's own thread; False (logged, closed) if it failed."""
        from ..engine.tls import TlsError
        try:
            link.transport.handshake(self.settings.listen_timeout)
            return True
        except (TlsError, OSError) as exc:
            self.uplink_log.warning(link.source, "%s: TLS failed: %s", link.name,
                                    exc if isinstance(exc, TlsError) else exc.strerror or exc)
            return False
