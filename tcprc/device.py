"""DeviceSideApp: dial the server, send LISTEN, connect to the service on each CONNECT.

Target policy: a CONNECT reaches only the configured local target (an empty
address means it) or a target listed in `allow`; anything else is refused
with CLOSE, so a server cannot steer the device into its private network.

Early DATA: the Java server starts reading a new client before it writes
that client's CONNECT, so a client that speaks first can have DATA on the
uplink ahead of its CONNECT.  DATA for an id never seen is held (bounded)
and handed to the stream when the CONNECT comes; only when none comes is
it dropped and answered with one CLOSE.  An id this side closed stays quiet
for a while: its late DATA is dropped without another CLOSE, and if that
CLOSE refused early DATA, a CONNECT that was already in flight for it is
stale and opens nothing (the Java server answers our CLOSE with its own,
which ends the quiet time; a tcprc server does not, hence the bound).

The check is on resolved addresses: a CONNECT to `localhost:L` reaches a
`local` of 127.0.0.1:L; a name or spelling that resolves to another
address or port is refused; of a name with several addresses, only the
allowed ones are dialed.  The lookups run in the stream's pump thread,
which dials exactly the address it checked; a CONNECT naming its target
as configured (or an empty address) needs no extra lookup.

The legacy default target, a loopback address on port 23 (telnet on the
device itself), is what a tcprc server sends by default and what legacy
servers send when told nothing else.  When it is neither `local` nor in
`allow`, it is taken as a request for the default target, like an empty
address: the device dials its own `local`, so this grants nothing new.
"""

import logging
import os
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from . import protocol
from .addr import (SockAddr, connect_resolved, connect_tcp, format_hostport, parse_hostport,
                   resolve_tcp, sockaddr_key)
from .link import Link
from .pump import REFUSED, Stream, TargetRefused

log = logging.getLogger("tcprc.device")

HostPort = Tuple[str, int]

# Early DATA is held this long for its CONNECT (the Java server writes it a
# moment after the DATA), and at most this much per id and in all.  The
# wait only runs while the uplink is read: a paused link has not yet read
# the CONNECT.
EARLY_WAIT = 2.0
EARLY_PER_ID = 64 * 1024
EARLY_TOTAL = 256 * 1024
# How long an id closed here stays quiet without the server's CLOSE for it.
QUIET = 10.0


LEGACY_DEFAULT_PORT = 23
# A server that hangs up this soon after LISTEN, having sent nothing, refused us.
REFUSED_WITHIN = 10.0


def _is_loopback(address: str) -> bool:
    """A loopback address as written (no lookup): 127.x.x.x, ::1 or localhost."""
    if address in ("localhost", "::1"):
        return True
    try:
        return socket.inet_pton(socket.AF_INET, address)[0] == 127
    except OSError:
        return False


def allowed_only(wanted: List[SockAddr], targets: List[HostPort]) -> List[SockAddr]:
    """The resolved addresses in `wanted` that one of `targets` resolves to, in order."""
    permitted = set()
    for host, port in targets:
        if any(sockaddr[1] == port for _, sockaddr in wanted):   # other ports: no lookup
            try:
                permitted.update(map(sockaddr_key, resolve_tcp(host, port)))
            except OSError:
                pass   # an allowed name that does not resolve allows nothing
    return [item for item in wanted if sockaddr_key(item) in permitted]


class DeviceLink(Link):
    role = "device"

    def __init__(self, sock: socket.socket, settings: Any, name: str,
                 target: HostPort, allowed: Set[HostPort]):
        super().__init__(sock, settings, name)
        self.target = target
        self.allowed = allowed
        # Per client id, so at most 256 entries each; cleared at teardown.
        self._early: Dict[int, List[Any]] = {}         # id -> [bytearray, deadline]
        self._early_bytes = 0
        self._early_sweep_armed = False
        self._quiet: Dict[int, Tuple[float, bool]] = {}  # id -> (closed at, refused early DATA)
        self.refused = False
        self._port_23_configured = any(p == LEGACY_DEFAULT_PORT for _, p in [target] + list(allowed))

    def on_start(self) -> None:
        self.post(protocol.LISTEN, 0)

    def on_teardown(self) -> None:
        self._early.clear()
        self._early_bytes = 0
        self._quiet.clear()

    def on_silent_close(self) -> str:
        up = time.monotonic() - self.started
        if up >= REFUSED_WITHIN:
            return super().on_silent_close()
        # A legacy server has nothing to say before a client comes; closing
        # at once is how a server turns a device away.
        self.refused = True
        return ("refused by the server: it closed the uplink %.1f s after LISTEN, before any "
                "frame (another device may hold its tunnel, or this one is not let in)" % up)

    def on_connect(self, client_id: int, payload: memoryview) -> None:
        early = self._take_early(client_id)
        if early is None:
            return
        old = self.streams.get(client_id)
        if old is not None:
            # Legacy rule: a CONNECT on a busy id replaces the stream, silently.
            self.close_stream(old, "replaced by a new CONNECT", notify_peer=False)
        try:
            address, port = protocol.decode_connect_payload(payload)
        except protocol.ProtocolError as exc:
            self.noisy.warning("%s: refused client %d: %s", self.name, client_id, exc)
            self.post(protocol.CLOSE, client_id)
            return
        if not address or (port == LEGACY_DEFAULT_PORT and not self._port_23_configured
                           and _is_loopback(address)):
            # The legacy default cannot resolve to a target on another port:
            # straight to `local`, with no lookup (a default server's CONNECT).
            host, port = self.target
        elif (address, port) == self.target or (address, port) in self.allowed:
            host = address
        else:
            # Needs name lookups: the pump thread does them, never this one.
            stream = Stream(client_id, format_hostport(address, port))
            self._give_early(stream, early)
            self.open_stream(stream, connect_to=lambda: self._dial_checked(client_id, address, port))
            return
        peer = format_hostport(host, port)
        self.log.info("%s: client %d: connecting to %s", self.name, client_id, peer)
        stream = Stream(client_id, peer)
        self._give_early(stream, early)
        self.open_stream(stream, connect_to=(host, port, self.settings.connect_timeout))

    def _dial_checked(self, client_id: int, address: str, port: int) -> socket.socket:
        """Pump thread: resolve the CONNECT's target and dial it only where the policy allows."""
        requested = format_hostport(address, port)
        try:
            wanted = resolve_tcp(address, port)
        except OSError as exc:
            raise TargetRefused("CONNECT to %s: the name does not resolve (%s)"
                                % (requested, exc.strerror or exc)) from None
        chosen = allowed_only(wanted, [self.target] + sorted(self.allowed))
        timeout = self.settings.connect_timeout
        if chosen:
            self.log.info("%s: client %d: connecting to %s (%s)", self.name, client_id,
                          requested, format_hostport(*chosen[0][1][:2]))
            return connect_resolved(chosen, timeout)
        if port == LEGACY_DEFAULT_PORT and _is_loopback(address):
            self.log.info("%s: client %d: %s is the legacy default target: connecting to %s",
                          self.name, client_id, requested, format_hostport(*self.target))
            return connect_tcp(self.target[0], self.target[1], timeout)
        raise TargetRefused("CONNECT to %s (%s) is not the configured target %s nor in "
                            "[device] allow" % (requested, ", ".join(
                                format_hostport(*item[1][:2]) for item in wanted),
                                format_hostport(*self.target)))

    def on_stream_closed(self, stream: Stream, reason: str) -> None:
        if reason.startswith(REFUSED):   # rate-limited: the server picks what it names
            self.noisy.warning("%s: refused client %d: %s", self.name, stream.id,
                               reason[len(REFUSED):])
        else:
            super().on_stream_closed(stream, reason)

    # ---- DATA before CONNECT, and ids closed here -----------------------------------
    def _take_early(self, client_id: int) -> Optional[bytearray]:
        """On CONNECT: the DATA held for `client_id` (maybe empty); None if the CONNECT is stale."""
        quiet = self._quiet.pop(client_id, None)
        if quiet is not None and quiet[1] and time.monotonic() - quiet[0] < QUIET:
            # Sent before the server saw our CLOSE: its client is gone already.
            self._quiet[client_id] = quiet
            self.log.debug("%s: stale CONNECT for client %d (refused before, no CLOSE from "
                           "the server yet): ignored", self.name, client_id)
            return None
        return self._drop_early(client_id) or bytearray()

    def _give_early(self, stream: Stream, early: bytearray) -> None:
        # Queued ahead of any later DATA; written once the connect completes (attach).
        if early:
            stream.queue(memoryview(early))
            stream.bytes_from_peer += len(early)
            self.bytes_from_peer += len(early)

    def on_unknown_data(self, client_id: int, payloads: List[memoryview]) -> None:
        quiet = self._quiet.get(client_id)
        if quiet is not None:
            if time.monotonic() - quiet[0] < QUIET:
                return   # late DATA for an id closed here: it has its CLOSE
            del self._quiet[client_id]
        size = sum(map(len, payloads))
        entry = self._early.get(client_id)
        held = len(entry[0]) if entry is not None else 0
        if held + size > EARLY_PER_ID or self._early_bytes + size > EARLY_TOTAL:
            self._refuse_early(client_id, "more DATA before its CONNECT than the device holds")
            return
        if entry is None:
            entry = self._early[client_id] = [bytearray(), time.monotonic() + EARLY_WAIT]
            self._arm_early_sweep(EARLY_WAIT)
        for payload in payloads:
            entry[0] += payload
        self._early_bytes += size

    def _drop_early(self, client_id: int) -> Optional[bytearray]:
        entry = self._early.pop(client_id, None)
        if entry is None:
            return None
        self._early_bytes -= len(entry[0])
        return entry[0]

    def _refuse_early(self, client_id: int, why: str) -> None:
        self._drop_early(client_id)
        self.noisy.warning("%s: client %d: %s: answered CLOSE", self.name, client_id, why)
        self.post(protocol.CLOSE, client_id)
        self._quiet[client_id] = (time.monotonic(), True)

    def _arm_early_sweep(self, delay: float) -> None:
        # One timer for all held ids: a timer per hold would pile up in the
        # loop's heap when a server holds and closes ids in a fast cycle.
        if not self._early_sweep_armed:
            self._early_sweep_armed = True
            self.loop.call_later(delay, self._early_sweep)

    def _early_sweep(self) -> None:
        self._early_sweep_armed = False
        if not self._early:
            return
        now = time.monotonic()
        if self._paused or self._control_full:
            # Not reading: the CONNECT may be waiting unread; give it time after reading resumes.
            for entry in self._early.values():
                entry[1] = max(entry[1], now + EARLY_WAIT / 4)
        else:
            for client_id in [c for c, entry in self._early.items() if entry[1] <= now]:
                self._refuse_early(client_id, "DATA with no CONNECT for %g s" % EARLY_WAIT)
        if self._early:
            self._arm_early_sweep(max(0.01, min(e[1] for e in self._early.values()) - now))

    def post(self, command: int, client_id: int, payload: bytes = b"") -> None:
        if command == protocol.CLOSE:
            self._quiet[client_id] = (time.monotonic(), False)
        super().post(command, client_id, payload)

    def pump_exited(self, stream: Stream, reason: str) -> None:
        if self.streams.get(stream.id) is stream:
            self._quiet[stream.id] = (time.monotonic(), False)   # its pump sent the CLOSE
        super().pump_exited(stream, reason)

    def _on_close(self, client_id: int, payload: memoryview) -> None:
        # The server's CLOSE ends the quiet time, and any wait for a CONNECT.
        self._quiet.pop(client_id, None)
        self._drop_early(client_id)
        super()._on_close(client_id, payload)


class Backoff:
    """Exponential reconnect delay with jitter, reset after a healthy uplink."""

    def __init__(self, first: float, cap: float):
        self.first, self.cap = first, cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * (2 ** min(self.failures, 32)))
        self.failures += 1
        # Equal jitter: never less than half, so a fleet spreads out yet still waits.
        # (os.urandom, not the random module: that import alone costs ~0.7 MB.)
        return delay / 2 + delay / 2 * int.from_bytes(os.urandom(2), "big") / 0xFFFF

    def reset(self) -> None:
        self.failures = 0


def _tunnel_settings_key(settings: Any) -> Tuple[Any, ...]:
    """The settings whose change requires a new uplink."""
    return tuple(getattr(settings, k) for k in (
        "server", "local", "allow", "keepalive_idle", "keepalive_interval",
        "keepalive_count", "send_timeout", "stream_buffer", "stall_timeout", "connect_timeout"))


class DeviceApp:
    def __init__(self, settings: Any):
        self.settings = settings
        self._cond = threading.Condition()
        self._server: Optional[HostPort] = None      # None: stay idle
        self._local: HostPort = parse_hostport(settings.local)
        self._generation = 0
        self._closing = False
        self._link: Optional[DeviceLink] = None
        self._state = "idle"
        self._last_error = ""
        self._up_since: Optional[float] = None
        self._totals = [0, 0]                         # bytes up/down of finished uplinks
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._thread: Optional[threading.Thread] = None

    # ---- public API (thread-safe) -------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tcprc-device", daemon=True)
        self._thread.start()
        if self.settings.autostart and self.settings.server:
            self.connect()

    def connect(self, server: Optional[HostPort] = None, local: Optional[HostPort] = None) -> None:
        """Start or restart the tunnel; None takes the value from the settings."""
        if server is None:
            if not self.settings.server:
                raise ValueError("no server address: give one or set [device] server")
            server = parse_hostport(self.settings.server)
        if local is None:
            local = parse_hostport(self.settings.local)
        with self._cond:
            self._server, self._local = server, local
            self._restart_locked("restarted by TCPRemoteConnect")

    def disconnect(self) -> None:
        with self._cond:
            self._server = None
            self._restart_locked("closed by TCPRemoteDisconnect")

    def apply_settings(self, settings: Any) -> None:
        """New settings (SIGHUP, config set): the tunnel restarts only if its own settings changed."""
        with self._cond:
            changed = _tunnel_settings_key(settings) != _tunnel_settings_key(self.settings)
            self.settings = settings
            self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
            if not changed:
                return
            self._local = parse_hostport(settings.local)
            if settings.server and (self._server is not None or settings.autostart):
                self._server = parse_hostport(settings.server)
            elif not settings.server:
                self._server = None
            self._restart_locked("settings changed")

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._restart_locked("agent stopping")
        if self._thread is not None:
            self._thread.join(10)

    def status(self) -> Dict[str, Any]:
        with self._cond:
            link = self._link
            up, down = self._totals
            stats = link.stats() if link is not None else None
            return {
                "state": self._state,
                "server": format_hostport(*self._server) if self._server else "",
                "local": format_hostport(*self._local),
                "clients": stats["clients"] if stats else 0,
                "bytes_up": up + (stats["bytes_sent"] if stats else 0),
                "bytes_down": down + (stats["bytes_received"] if stats else 0),
                "uptime": (time.monotonic() - self._up_since) if self._up_since else None,
                "last_error": self._last_error,
            }

    # ---- the supervisor thread ------------------------------------------------------
    def _restart_locked(self, reason: str) -> None:
        self._generation += 1
        if self._link is not None:
            self._link.stop(reason)
        self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closing and self._server is None:
                    self._state = "idle"
                    self._cond.wait()
                if self._closing:
                    self._state = "idle"
                    return
                generation, server, local = self._generation, self._server, self._local
                settings = self.settings
                self._state = "connecting"
            healthy = self._serve_once(generation, server, local, settings)
            if healthy:
                self._backoff.reset()
            with self._cond:
                if self._closing or generation != self._generation:
                    continue   # told to stop or to use new settings: no waiting
                delay = self._backoff.next_delay()
                self._state = "backoff"
                log.info("reconnecting to %s in %.1f s", format_hostport(*server), delay)
                deadline = time.monotonic() + delay
                while not self._closing and generation == self._generation:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)

    def _serve_once(self, generation: int, server: HostPort, local: HostPort, settings: Any) -> bool:
        """Dial and serve one uplink; True if it stayed up long enough to count as healthy."""
        name = "uplink %s" % format_hostport(*server)
        try:
            sock = connect_tcp(server[0], server[1], settings.connect_timeout)
        except OSError as exc:
            with self._cond:
                self._last_error = "connect to %s failed: %s" % (format_hostport(*server),
                                                                  exc.strerror or exc)
            log.warning("%s", self._last_error)
            return False
        try:
            allowed = {parse_hostport(item) for item in settings.allow}
            link = DeviceLink(sock, settings, name, local, allowed)
        except OSError as exc:
            sock.close()
            with self._cond:
                self._last_error = "uplink setup failed: %s" % exc
            return False
        with self._cond:
            if self._closing or generation != self._generation:
                link.stop("superseded")
            self._link = link
            self._state = "up"
            self._up_since = time.monotonic()
        log.info("%s: connected, LISTEN sent, clients go to %s", name, format_hostport(*local))
        try:
            link.run()
        finally:
            with self._cond:
                stats = link.stats()
                self._totals[0] += stats["bytes_sent"]
                self._totals[1] += stats["bytes_received"]
                self._link = None
                self._state = "idle" if self._server is None or self._closing else "backoff"
                up_for = time.monotonic() - (self._up_since or time.monotonic())
                self._up_since = None
                if link.end_reason and generation == self._generation and not self._closing:
                    self._last_error = link.end_reason if link.refused else \
                        "uplink lost: %s" % link.end_reason
        if link.refused:
            log.warning("%s: %s", name, link.end_reason)
        return up_for >= settings.healthy_after
