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
from typing import Any, Dict, List, Optional, Set, Tuple

from ..addr import address_in, format_hostport, parse_hostport, parse_network, source_key
from ..engine.ratelog import LimitedLog, SourceLog
from ..engine.loop import Loop
from ..engine.sockets import accept_nowait, bind_listener
from .link import HANDOVER, ServerLink, open_server_link
from .throttle import AuthThrottle, LateHellos
from ..settings import ServerSettings

log = logging.getLogger("tcprc.server")

HostPort = Tuple[str, int]


class HostSlot:
    """One host port: its listener (the app's to open and close), the uplink that
    serves it, and the one waiting to take it over.  Under the app's lock."""

    def __init__(self, host: str) -> None:
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

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.listen_address: Optional[HostPort] = None
        self._lock = threading.Lock()
        self._slots: Dict[str, HostSlot] = {}   # host -> its slot, while claimed
        self._links: Set[ServerLink] = set()
        self._threads: Set[threading.Thread] = set()
        self._loop = Loop()
        self._listener: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None
        self._last_error = ""
        self._totals = [0, 0]
        self._pending: Dict[ServerLink, None] = {}   # waiting for LISTEN, oldest first
        self._allow = [parse_network(n) for n in settings.allow_from]
        self.uplink_log = SourceLog(log)
        self._accept_errors = LimitedLog(log)
        self.throttle = AuthThrottle()
        self.late_hellos = LateHellos()   # sources whose HELLO came after the legacy decision
        self.auth_failures = 0
        self._tls = server_tls(settings)   # ConfigError here: the start stops
        self.client_certificates = bool(settings.tls_client_ca)

    @property
    def host_address(self) -> Optional[HostPort]:
        """Where [server] host accepts clients, while a session holds it."""
        slot = self._slots.get(self.settings.host)
        return slot.address if slot is not None else None

    def link_on(self, host: Optional[str] = None) -> Optional[ServerLink]:
        """The uplink that serves `host` ([server] host by default), if any."""
        slot = self._slots.get(host or self.settings.host)
        return slot.active if slot is not None else None

    def device_host_address(self, device_id: str) -> Optional[HostPort]:
        """Where a configured device's clients are accepted, while its session is up."""
        slot = self._slots.get(self.host_for(device_id))
        return slot.address if slot is not None else None

    # ---- what links ask (any thread) ------------------------------------------------
    def secret_of(self, device_id: str) -> Optional[bytes]:
        entry = self.settings.devices.get(device_id)
        return entry.secret.reveal() if entry is not None else None

    def host_for(self, device_id: str) -> str:
        if device_id:
            entry = self.settings.devices.get(device_id)
            if entry is not None:
                return entry.host
        return self.settings.host

    def auth_passed(self, link: ServerLink) -> None:
        pass

    def auth_failed(self, link: ServerLink, device_id: str, message: str) -> None:
        """One line per failure, naming the id and the source.  A failure that named
        an id (a guess at its secret, maybe) slows its source down."""
        with self._lock:
            self.auth_failures += 1
        if not device_id:
            self.uplink_log.warning(link.source, "%s: device without id refused: %s",
                                    link.name, message)
            return
        import time
        penalty = self.throttle.failed(link.source, time.monotonic())
        self.uplink_log.warning(link.source, "%s: device %s refused: %s (its source waits %.1f s "
                                "before its next try)", link.name, device_id, message, penalty)

    # ---- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Bind the uplink port (errors raise OSError here, at start) and serve it."""
        self._listener = bind_listener(parse_hostport(self.settings.listen, allow_zero_port=True))
        self.listen_address = self._listener.getsockname()[:2]
        self._loop.set_handlers(self._listener, self._accept_uplink, None)
        self._thread = threading.Thread(target=self._loop.run, name="tcprc-server", daemon=True)
        self._thread.start()
        log.info("waiting for devices on %s", format_hostport(*self.listen_address))
        self._warn_if_open()

    def _warn_if_open(self) -> None:
        wide = [n for n, (_, _, prefix) in zip(self.settings.allow_from, self._allow) if prefix == 0]
        if wide:
            log.warning("legacy uplinks are accepted from anywhere (allow_from %s): the legacy "
                        "protocol has no authentication, whoever reaches %s can take the tunnel "
                        "and its clients; narrow [server] allow_from or firewall the port",
                        ", ".join(wide), format_hostport(*self.listen_address))

    def close(self) -> None:
        self._loop.call_soon(self._loop.stop)
        if self._thread is not None:
            self._thread.join(5)
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
        """New settings: a changed listen port cannot move without a restart; say so."""
        if settings.listen != self.settings.listen:
            log.warning("listen address change to %s needs a restart; still on %s",
                        settings.listen, self.settings.listen)
        changed = settings.host != self.settings.host or settings.connect_port != self.settings.connect_port \
            or settings.connect_address != self.settings.connect_address
        allow_changed = settings.allow_from != self.settings.allow_from
        old_host = self.settings.host
        old_devices = self.settings.devices
        tls_changed = (settings.tls_cert, settings.tls_key, settings.tls_client_ca) != \
            (self.settings.tls_cert, self.settings.tls_key, self.settings.tls_client_ca)
        if tls_changed:   # a rotated certificate: new uplinks get it, live ones keep theirs
            self._tls = server_tls(settings)
            self.client_certificates = bool(settings.tls_client_ca)
        self.settings = settings
        if settings.devices != old_devices:
            # A device removed or changed (secret, host) loses its session; it redials.
            with self._lock:
                links = list(self._links)
            for link in links:
                if link.device_id and old_devices.get(link.device_id) != \
                        settings.devices.get(link.device_id):
                    link.stop("device %s changed in the configuration" % link.device_id)
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
                slot = self._slots.get(old_host)
                active = slot.active if slot is not None else None
            if active is not None:
                active.stop("settings changed")

    def status(self) -> Dict[str, Any]:
        """The tunnel of [server] host, or else the latest device session, and totals."""
        with self._lock:
            slots = [slot for slot in self._slots.values() if slot.active is not None]
            slot = self._slots.get(self.settings.host)
            if slot is None or slot.active is None:
                slot = max(slots, key=lambda s: s.active.started) if slots else None
            link = slot.active if slot is not None else None
            up, down = self._totals
            for other in slots:
                stats = other.active.stats()
                up += stats["bytes_received"]
                down += stats["bytes_sent"]
            stats = link.stats() if link is not None else None
            return {
                "state": "up" if link is not None else "waiting",
                "listen": format_hostport(*self.listen_address) if self.listen_address else "",
                "host": format_hostport(*slot.address) if slot is not None and slot.address else "",
                "device": link.name if link is not None else "",
                "device_id": link.device_id if link is not None else "",
                "protocol": stats["protocol"] if stats else "",
                "tls": stats["tls"] if stats else ("on" if self._tls else "off"),
                "rtt": stats["rtt"] if stats else None,
                "sessions": len(slots),
                "clients": stats["clients"] if stats else 0,
                "bytes_up": up,
                "bytes_down": down,
                "uptime": stats["uptime"] if stats else None,
                "auth_failures": self.auth_failures,
                "last_error": self._last_error,
            }

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
        thread = threading.Thread(target=self._serve, args=(link,), name="tcprc-uplink", daemon=True)
        with self._lock:
            victims = self._make_room(link.source)
            self._links.add(link)
            self._pending[link] = None
        for victim, reason in victims:
            victim.evict(reason)
        self.uplink_log.info(link.source, "uplink from %s accepted", who)
        thread.start()

    def _make_room(self, source: Any) -> List[Tuple[ServerLink, str]]:
        """Under the lock: the waiting uplinks to drop so one more may wait.

        The one waiting longest goes, never the newcomer: a device sends LISTEN
        at once, so an old waiter is the least likely to be one.  Over the
        per-source cap, the source's own oldest goes (a device behind the same
        NAT still gets in); over the global cap, the oldest of all.
        """
        victims = []
        mine = [link for link in self._pending if link.source == source]
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
                return
            link.run()
        finally:
            with self._lock:
                self._links.discard(link)
                self._pending.pop(link, None)
                if link.listening and link.end_reason:
                    self._last_error = "%s: %s" % (link.name, link.end_reason)

    def _handshake(self, link: ServerLink) -> bool:
        """The TLS handshake, in the link's own thread; False (logged, closed) if it failed."""
        from ..engine.tls import TlsError
        try:
            link.transport.handshake(self.settings.listen_timeout)
            return True
        except (TlsError, OSError) as exc:
            self.uplink_log.warning(link.source, "%s: TLS failed: %s", link.name,
                                    exc if isinstance(exc, TlsError) else exc.strerror or exc)
            link.transport.close()
            return False

    def claim_host(self, link: ServerLink) -> Any:
        """Link thread, once its session is established: the host listener for `link`
        (its wanted_host); None when refused; HANDOVER when a live uplink holds
        it: that one is told to stop, and its teardown hands the port to `link`
        (release_host).  Never waits.  A device's host is only ever claimed by
        sessions that authenticated as that device (host_for)."""
        host = link.wanted_host
        with self._lock:
            slot = self._slots.get(host)
            if slot is None:
                slot = HostSlot(host)
                sock = slot.bind(link)   # OSError: the caller says why
                self._slots[host] = slot
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

    def release_host(self, link: ServerLink) -> None:
        """Link thread, at teardown (no longer watching its host listener): the
        listener is closed, and the port goes to the uplink waiting for it, if
        any, through that uplink's own loop."""
        with self._lock:
            for slot in self._slots.values():
                if slot.successor is link:
                    slot.successor = None   # it ended while waiting
                    return
                if slot.active is link:
                    break
            else:
                return
            stats = link.stats()
            self._totals[0] += stats["bytes_received"]
            self._totals[1] += stats["bytes_sent"]
            slot.unbind()
            successor, slot.successor = slot.successor, None
            if successor is None:
                del self._slots[slot.host]
                return
            sock, error = None, None
            try:
                sock = slot.bind(successor)
            except OSError as exc:
                error = exc
                del self._slots[slot.host]
        successor.loop.call_soon(lambda: successor.host_ready(sock, error))
