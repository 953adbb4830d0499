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
        self.ports = Ports(self.uplink_log, lambda: self.settings.takeover)
        self.auth = Auth(self.fleet, self.uplink_log, bool(settings.tls_client_ca))
        self.link_parts = LinkParts(self.ports, self.fleet, self.auth, self.uplink_log,
                                self._established)
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
        }

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
        (id ":legacy") while it is up.  Thread-safe."""
        return self.fleet.rows(self.ports)

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
