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
from ..addr import ports_collide
from ..engine.ratelog import LimitedLog, SourceLog
from ..engine.liveness import TICK, Liveness
from ..engine.loop import Loop
from ..engine.sockets import accept_nowait, bind_for, bind_listener
from .fleet import SHARED, DeviceRecord, sync_records
from .link import HANDOVER, ServerLink, open_server_link
from .throttle import AuthThrottle
from ..settings import ServerSettings

log = logging.getLogger("tcprc.server")

HostPort = Tuple[str, int]

SCAN_LIMIT = 300.0   # seconds a devices_dir scan may take before the server counts as stuck


class HostSlot:
    """One host port: its listener (the app's to open and close), the uplink that
    serves it, and the one waiting to take it over.  Under the app's lock.

    Slots are the owners' (a device id, "" for [server] host), not the host
    strings': two devices with "127.0.0.1:0" get a port each."""

    def __init__(self, owner: str, host: str) -> None:
        self.owner = owner
        self.host = host
        self.active: Optional[ServerLink] = None
        self.successor: Optional[ServerLink] = None
        self.sock: Optional[socket.socket] = None
        self.address: Optional[HostPort] = None

    def bind(self, link: ServerLink) -> socket.socket:
        sock = bind_listener(parse_hostport(self.host, allow_zero_port=True))
        self.active, self.sock = link, sock
        self.address = sock.getsockname()[:2]
        return sock

    def unbind(self) -> None:
        self.active = None
        self.address = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def server_tls(settings: ServerSettings) -> Any:
    """The TLS context [server] asks for, or None; ConfigError on unusable files."""
    if not settings.tls_cert:
        return None
    from ..engine.tls import server_context
    return server_context(settings.tls_cert, settings.tls_key, settings.tls_client_ca or None)


class ServerApp:
    """The server agent: an acceptor loop in its own thread takes uplinks; each
    ServerLink runs in a thread of its own; one of them holds the host port.

    Public methods (start, close, apply_settings, status) are thread-safe.
    listened(), claim_host() and release_host() are called by links from their
    own threads, under the app's lock, and never wait for another link.
    """

    SCAN_INTERVAL = 5.0   # seconds between looks at devices_dir (a stat per file)

    def __init__(self, settings: ServerSettings, device_files: Optional[Callable[[str], Any]] = None):
        """`device_files(path)`: what reads [server] devices_dir (ops.devdir.DeviceFiles;
        the wiring passes it in: the server layer does not parse config files)."""
        self.settings = settings
        self.listen_address: Optional[HostPort] = None
        self._lock = threading.Lock()
        self._slots: Dict[str, HostSlot] = {}   # owner (device id, "" shared, "ID/NAME" a service) -> slot
        self._links: Set[ServerLink] = set()
        self.liveness = Liveness()
        self._loop = Loop(on_error=self._acceptor_error)
        self._acceptor_errors = LimitedLog(log, interval=10.0)
        self.uplinks_refused = 0   # no thread could start for them
        self._started = 0.0
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._last_error = ""
        self._totals = [0, 0]
        self._pending: Dict[ServerLink, None] = {}   # waiting for LISTEN, oldest first
        self._allow = [parse_network(n) for n in settings.allow_from]
        self.uplink_log = SourceLog(log)
        self._accept_errors = LimitedLog(log)
        self.throttle = AuthThrottle()
        self.auth_failures = 0
        self._tls = server_tls(settings)   # ConfigError here: the start stops
        self.client_certificates = bool(settings.tls_client_ca)
        self._device_files = device_files
        self._dir: Any = None
        self._dir_path = ""
        self._from_files: Dict[str, Any] = {}
        self._scan_lock = threading.Lock()   # one scan at a time (scanner, SIGHUP)
        self._scanner: Optional[threading.Thread] = None
        self._stopping = threading.Event()
        self._devices: Mapping[str, Any] = settings.devices   # [server.devices] + devices_dir
        self._records: Dict[str, DeviceRecord] = {}
        sync_records(self._records, self._devices)
        self._http: Any = None
        self.scans = 0   # periodic scans done (tests wait on it)
        self._open_dir(settings, force=True)

    @property
    def host_address(self) -> Optional[HostPort]:
        """Where [server] host accepts clients, while a session holds it."""
        slot = self._slots.get("")
        return slot.address if slot is not None else None

    @property
    def http_address(self) -> Optional[HostPort]:
        """Where [server] http serves the status page, once started."""
        return self._http.address if self._http is not None else None

    def link_on(self, device_id: str = "") -> Optional[ServerLink]:
        """The uplink that holds `device_id`'s host port ([server] host by default)."""
        slot = self._slots.get(device_id)
        return slot.active if slot is not None else None

    def device_host_address(self, device_id: str) -> Optional[HostPort]:
        """Where a configured device's clients are accepted, while its session is up."""
        slot = self._slots.get(device_id) if device_id else None
        return slot.address if slot is not None else None

    def service_address(self, device_id: str, name: str) -> Optional[HostPort]:
        """Where clients of a device's service `name` are accepted, while its session is up."""
        slot = self._slots.get("%s/%s" % (device_id, name)) if device_id else None
        return slot.address if slot is not None else None

    # ---- what links ask (any thread) ------------------------------------------------
    def secret_of(self, device_id: str) -> Any:
        """The secret of a configured device (with its previous one while it is
        rotated: either proves the id); None for an unknown id."""
        entry = self._devices.get(device_id)
        if entry is None:
            return None
        if entry.previous is not None:
            return [entry.secret.reveal(), entry.previous.reveal()]
        return entry.secret.reveal()

    def host_for(self, device_id: str) -> str:
        if device_id:
            entry = self._devices.get(device_id)
            if entry is not None:
                return entry.host
        return self.settings.host

    def services_of(self, device_id: str) -> Mapping[str, str]:
        """A configured device's named services: name -> host."""
        entry = self._devices.get(device_id)
        return entry.services if entry is not None else MappingProxyType({})

    def auth_failed(self, link: ServerLink, device_id: str, message: str) -> None:
        """One line per failure, naming the id and the source.  A failure that named
        an id (a guess at its secret, maybe) slows its source down."""
        with self._lock:
            self.auth_failures += 1
            record = self._records.get(device_id) if device_id else None
            if record is not None:   # a configured id: its table shows it
                record.auth_failures += 1
                record.last_error = "%s: authentication failed: %s" % (link.name, message)
        if not device_id:
            self.uplink_log.warning(link.source, "%s: device without id refused: %s",
                                    link.name, message)
            return
        penalty = self.throttle.failed(link.source, device_id, time.monotonic())
        self.uplink_log.warning(link.source, "%s: device %s refused: %s (its next try from this "
                                "address waits %.1f s)", link.name, device_id, message, penalty)

    def auth_passed(self, link: ServerLink, device_id: str) -> None:
        """The session proved `device_id`'s secret: that id's failures from its
        source are forgotten."""
        self.throttle.succeeded(link.source, device_id)

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
        with self._lock:
            held = {slot.owner for slot in self._slots.values() if slot.sock is not None}
        for ident, entry in sorted(self._devices.items()):
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
            self.client_certificates = bool(settings.tls_client_ca)
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
            with self._lock:
                slot = self._slots.get("")
                active = slot.active if slot is not None else None
            if active is not None:
                active.stop("settings changed")

    def status(self) -> Dict[str, Any]:
        """The server as a whole: its listeners, its sessions and devices, totals.
        One device's session is `device ID` / `devices`, never this."""
        with self._lock:
            links = [slot.active for slot in self._slots.values()   # a session each: no
                     if slot.active is not None and "/" not in slot.owner]   # service port
            shared = self._slots.get("")
            records = [r for ident, r in self._records.items() if ident != SHARED]
            up, down = self._totals
            clients = 0
            protocols, transports = set(), set()
            for link in links:
                stats = link.stats()
                up += stats["bytes_received"]
                down += stats["bytes_sent"]
                clients += stats["clients"]
                protocols.add(stats["protocol"])
                transports.add(stats["tls"])
            configured = len(records)
            devices_up = sum(1 for r in records if r.link is not None)
        http = self.http_address
        return {
            "state": "up" if links else "waiting",
            "listen": format_hostport(*self.listen_address) if self.listen_address else "",
            "host": format_hostport(*shared.address) if shared is not None and shared.address
            else "",
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
        _drop_colliding_hosts(merged, settings)
        old, self._devices = self._devices, MappingProxyType(merged)
        with self._lock:
            sync_records(self._records, self._devices)
            links = list(self._links)
        for link in links:
            ident = link.device_id
            before, after = old.get(ident), self._devices.get(ident)
            if ident and before is not None and after is not None and before != after \
                    and before._replace(services=after.services) == after:
                link.loop.call_soon(link.sync_services)   # only its services changed
            elif ident and before != after:
                reason = "device %s %s the configuration" % (
                    ident, "changed in" if ident in self._devices else "removed from")
                log.info("%s: its session (%s) is closed", reason, link.name)
                link.stop(reason)

    def devices(self) -> List[Dict[str, Any]]:
        """The device table: every configured device, then the session on [server] host
        (id ":legacy") while it is up.  Thread-safe."""
        with self._lock:
            rows = []
            for ident, record in sorted(self._records.items()):
                if ident == SHARED and record.link is None:
                    continue
                host = self.host_for("" if ident == SHARED else ident)
                slot = self._slots.get("" if ident == SHARED else ident)
                bound = slot.address if slot is not None and slot.active is record.link else None
                rows.append(record.row(host, bound))
                services = self.services_of(ident) if ident != SHARED else {}
                if services:   # "NAME=ADDR:PORT, ...": bound while up, else as configured
                    rows[-1]["services"] = ", ".join(
                        "%s=%s" % (name, self._service_address(ident, name, record.link)
                                   or services[name]) for name in sorted(services))
            return rows

    def _service_address(self, ident: str, name: str, link: Any) -> str:
        slot = self._slots.get("%s/%s" % (ident, name))
        if slot is None or slot.active is not link or slot.address is None:
            return ""
        return format_hostport(*slot.address)

    def kick(self, device_id: str) -> bool:
        """End a device's session (it may redial); False when it has none."""
        with self._lock:
            record = self._records.get(device_id)
            link = record.link if record is not None else None
        if link is None:
            return False
        log.info("device %s: session closed by the operator (kick)", device_id)
        link.stop("kicked by the operator")
        return True

    def session_up(self, link: ServerLink) -> None:
        """Link thread: its session has its host port: the device's record is up."""
        with self._lock:
            record = self._records.get(link.device_id or SHARED)
            if record is not None:
                record.started(link)
                link.record = record

    def client_refused(self, link: ServerLink) -> None:
        with self._lock:
            if link.record is not None:
                link.record.refused += 1

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
            link = open_server_link(sock, self.settings, "uplink %s" % who, self, peer[0],
                                    self._tls)
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

    def listened(self, link: ServerLink) -> None:
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
                if link.record is not None:
                    link.record.ended(link, link.end_reason)

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

    def claim_host(self, link: ServerLink) -> Any:
        """Link thread, once its session is established: the host listener for `link`
        (its wanted_host); None when refused; HANDOVER when a live uplink holds
        it: that one is told to stop, and its teardown hands the port to `link`
        (release_host).  Never waits.  A device's host is only ever claimed by
        sessions that authenticated as that device (host_for)."""
        host, owner = link.wanted_host, link.device_id
        with self._lock:
            slot = self._slots.get(owner)
            if slot is None:
                slot = HostSlot(owner, host)
                sock = slot.bind(link)   # OSError: the caller says why
                self._slots[owner] = slot
                return sock
            current = slot.active
            if not self.settings.takeover:
                refused = True
            else:
                refused = False
                waiting, slot.successor = slot.successor, link
        if refused:
            self.uplink_log.warning(link.source, "%s: LISTEN refused: the tunnel belongs to %s "
                                    "(takeover = false; host port %s)", link.name, current.name, host)
            return None
        self.uplink_log.warning(link.source, "%s: LISTEN takes over the tunnel from %s (host port %s)",
                                link.name, current.name, host)
        current.stop("replaced by %s" % link.name)
        if waiting is not None:   # an earlier newcomer still waiting: this one wins
            waiting.stop("replaced by %s" % link.name)
        return HANDOVER

    def claim_service(self, link: ServerLink, name: str, host: str) -> Optional[socket.socket]:
        """Link thread, once it holds its device's host port: the listener of the
        device's service `name` (OSError: it cannot be bound).  Its own slot,
        keyed "ID/NAME" (no id has a slash); a takeover has released the
        previous session's with its host port, so a slot still held is refused."""
        owner = "%s/%s" % (link.device_id, name)
        with self._lock:
            slot = self._slots.get(owner)
            if slot is None:
                slot = HostSlot(owner, host)
                sock = slot.bind(link)
                self._slots[owner] = slot
                return sock
            holder = slot.active
        if holder is not link:
            self.uplink_log.warning(link.source, "%s: service %s: its port %s is held by %s",
                                    link.name, name, host, holder.name if holder else "nobody")
        return None

    def service_host(self, link: ServerLink, name: str) -> Optional[str]:
        """The host `link` bound its service `name` to."""
        slot = self._slots.get("%s/%s" % (link.device_id, name))
        return slot.host if slot is not None and slot.active is link else None

    def release_service(self, link: ServerLink, name: str) -> None:
        """Link thread: one service port of `link` closed (no longer configured)."""
        owner = "%s/%s" % (link.device_id, name)
        with self._lock:
            slot = self._slots.get(owner)
            if slot is not None and slot.active is link:
                slot.unbind()
                del self._slots[owner]

    def release_host(self, link: ServerLink) -> None:
        """Link thread, at teardown (no longer watching its listeners): its host and
        service listeners are closed, and the host port goes to the uplink waiting
        for it, if any, through that uplink's own loop."""
        with self._lock:
            slot = None
            for other in list(self._slots.values()):
                if other.successor is link:
                    other.successor = None   # it ended while waiting
                    return
                if other.active is not link:
                    continue
                if "/" in other.owner:   # a service port: never handed over
                    other.unbind()
                    del self._slots[other.owner]
                else:
                    slot = other
            if slot is None:
                return
            stats = link.stats()
            self._totals[0] += stats["bytes_received"]
            self._totals[1] += stats["bytes_sent"]
            slot.unbind()
            successor, slot.successor = slot.successor, None
            if successor is None:
                del self._slots[slot.owner]
                return
            sock, error = None, None
            try:
                sock = slot.bind(successor)
            except OSError as exc:
                error = exc
                del self._slots[slot.owner]
        successor.loop.call_soon(lambda: successor.host_ready(sock, error))


def _drop_colliding_hosts(devices: Dict[str, Any], settings: ServerSettings) -> None:
    """Skip (one line each) a device from a file with a port (its host or a service's)
    that is another's, or [server] listen's, host's or http's (the configuration file's
    were checked at load)."""
    taken = [("[server] listen", settings.listen), ("[server] host", settings.host)]
    if settings.http:
        taken.append(("[server] http", settings.http))
    taken += [(owner, host) for entry in settings.devices.values()
              for _, owner, host in _ports_of(entry)]
    for ident in sorted(devices):
        if ident in settings.devices:
            continue
        clash, mine = "", []
        for what, owner, host in _ports_of(devices[ident]):
            other = next((who for who, port in taken if ports_collide(host, port)), "")
            if other:
                clash = "%s %s is the port of %s" % (what, host, other)
                break
            taken.append((owner, host))   # its next port must differ too
            mine.append(taken[-1])
        if clash:
            log.warning("devices_dir: device %s skipped: %s", ident, clash)
            del devices[ident]
            for item in mine:
                taken.remove(item)


def _ports_of(entry: Any) -> List[Tuple[str, str, str]]:
    """(what, owner, host) of each port of a DeviceEntry: its host, then its services'."""
    return [("its host", "device %s" % entry.id, entry.host)] + [
        ("its service %s's host" % name, "service %s of device %s" % (name, entry.id), host)
        for name, host in sorted(entry.services.items())]

