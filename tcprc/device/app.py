"""DeviceApp: dial the server (or each of a list in turn), serve one uplink at a
time, reconnect with backoff."""

import logging
import os
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from ..addr import format_hostport, parse_hostport
from ..engine.liveness import TICK, Liveness
from ..engine.ratelog import LimitedLog
from ..engine.sockets import connect_tcp
from ..engine.link import Link
from .link import device_tls, for_server, open_device_link
from ..keys import DEVICE_KEYS, SESSION
from ..settings import DeviceSettings

log = logging.getLogger("tcprc.device")

HostPort = Tuple[str, int]

SUPERVISOR = "tcprc-device (supervisor)"


def _stuck_after(settings: DeviceSettings) -> float:
    """How long the supervisor may go without a beat: a dial and a TLS handshake
    each take up to connect_timeout (a name lookup may add its own), so more."""
    return 2 * settings.connect_timeout + 60.0


def jittered(delay: float) -> float:
    """Equal jitter: between half `delay` and all of it, so a fleet spreads out yet
    still waits. (os.urandom, not the random module: that import alone costs ~0.7 MB.)"""
    return delay / 2 + delay / 2 * int.from_bytes(os.urandom(2), "big") / 0xFFFF


class Backoff:
    """Exponential reconnect delay with jitter, reset after a healthy uplink."""

    def __init__(self, first: float, cap: float):
        self.first, self.cap = first, cap
        self.failures = 0

    def next_delay(self) -> float:
        delay = min(self.cap, self.first * (2 ** min(self.failures, 32)))
        self.failures += 1
        return jittered(delay)

    def reset(self) -> None:
        self.failures = 0


# The settings whose change requires a new uplink: the keys that apply by restarting the tunnel.
TUNNEL_KEYS = tuple(name for name, key in DEVICE_KEYS.items() if key.applies == SESSION)


def _tunnel_settings_key(settings: DeviceSettings) -> Tuple[Any, ...]:
    return tuple(getattr(settings, k) for k in TUNNEL_KEYS)


def _server_list(servers: Tuple[str, ...]) -> Tuple[HostPort, ...]:
    return tuple(parse_hostport(server) for server in servers)


class DeviceApp:
    """The device agent: a supervisor thread dials the server and serves one
    uplink (a Link in the device role) at a time, reconnecting with backoff.

    With several servers ([device] server a list) there is still one uplink at
    a time: a round tries them in order. A failed dial moves to the next server
    at once; a lost session moves to the next after reconnect_min (jittered: a
    fleet whose server died does not arrive at the next in one burst), since the
    server that just dropped us is the least likely to take us back; a full
    round without a healthy session backs off (Backoff) and the next round
    starts again from the first. A healthy session (up for healthy_after)
    resets the backoff and begins a new round.

    Every public method (start, connect, disconnect, apply_settings, close,
    status) is thread-safe: channels (console, control socket, signals) call
    them from their own threads; they only change state under the condition
    and wake the supervisor, or stop the link through its thread-safe stop().
    """

    def __init__(self, settings: DeviceSettings):
        self.settings = settings
        self.liveness = Liveness()
        self._errors = LimitedLog(log, interval=10.0)
        self._cond = threading.Condition()
        self._servers: Tuple[HostPort, ...] = ()     # tried in order; (): stay idle
        self._next = 0                                # index of the server the next dial takes
        self._failed = 0                              # attempts of this round that failed
        self._dialled: Optional[HostPort] = None      # the server dialled now or last
        self._local: HostPort = parse_hostport(settings.local)
        self._generation = 0
        self._closing = False
        self._link: Optional[Link] = None
        self._state = "idle"
        self._last_error = ""
        self._up_since: Optional[float] = None
        self._totals = [0, 0]                         # bytes up/down of finished uplinks
        self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
        self._thread: Optional[threading.Thread] = None
        self._tls = device_tls(settings)   # ConfigError here: the start stops

    # ---- public API (thread-safe) -------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tcprc-device", daemon=True)
        self.liveness.watch(SUPERVISOR, self._thread, _stuck_after(self.settings))
        self._thread.start()
        if self.settings.autostart and self.settings.server:
            self.connect()
        else:
            log.info("idle: %s; waiting for TCPRemoteConnect (console or tcprc ctl)",
                     "autostart is off" if self.settings.server else
                     "no server configured ([device] server, --server)")

    def connect(self, server: Optional[HostPort] = None, local: Optional[HostPort] = None) -> None:
        """Start or restart the tunnel; None takes the value from the settings. A server
        given here replaces the configured list until the next connect()."""
        if server is None:
            if not self.settings.server:
                raise ValueError("no server address: give one or set [device] server")
            servers = _server_list(self.settings.server)
        else:
            servers = (server,)
        if local is None:
            local = parse_hostport(self.settings.local)
        with self._cond:
            self._servers, self._local = servers, local
            self._restart_locked("restarted by TCPRemoteConnect")

    def disconnect(self) -> None:
        with self._cond:
            self._servers = ()
            self._restart_locked("closed by TCPRemoteDisconnect")

    def apply_settings(self, settings: DeviceSettings) -> None:
        """New settings (SIGHUP, config set): the tunnel restarts only if its own settings changed."""
        tls = device_tls(settings)   # before anything changes: a bad file keeps the old settings
        with self._cond:
            changed = _tunnel_settings_key(settings) != _tunnel_settings_key(self.settings)
            self.settings = settings
            self.liveness.set_limit(SUPERVISOR, _stuck_after(settings))
            self._tls = tls
            self._backoff = Backoff(settings.reconnect_min, settings.reconnect_max)
            if not changed:
                return
            self._local = parse_hostport(settings.local)
            if settings.server and (self._servers or settings.autostart):
                self._servers = _server_list(settings.server)
            elif not settings.server:
                self._servers = ()
            self._restart_locked("settings changed")

    def health(self) -> List[str]:
        """What keeps this agent from keeping its tunnel: a critical thread ended or stuck."""
        return self.liveness.problems()

    def close(self) -> None:
        self.liveness.forget(SUPERVISOR)
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
            servers = self._servers
            current = self._dialled or (servers[0] if servers else None)
            status = {
                "state": self._state,
                "server": format_hostport(*current) if servers and current else "",
                "local": format_hostport(*self._local),
                "protocol": stats["protocol"] if stats else "",
                "tls": stats["tls"] if stats else ("on" if self._tls else "off"),
                "device_id": self.settings.id,
                "rtt": stats["rtt"] if stats else None,
                "clients": stats["clients"] if stats else 0,
                "bytes_up": up + (stats["bytes_sent"] if stats else 0),
                "bytes_down": down + (stats["bytes_received"] if stats else 0),
                "uptime": (time.monotonic() - self._up_since) if self._up_since else None,
                "last_error": self._last_error,
                "health": "; ".join(self.liveness.problems()) or "ok",
            }
            if len(servers) > 1:
                status["servers"] = ", ".join(format_hostport(*server) for server in servers)
            return status

    # ---- the supervisor thread ------------------------------------------------------
    def _restart_locked(self, reason: str) -> None:
        self._generation += 1
        self._next = self._failed = 0      # a new round, from the first server
        self._dialled = None
        if self._link is not None:
            self._link.stop(reason)
        self._cond.notify_all()

    def _run(self) -> None:
        """The supervisor thread, with its fault barrier: whatever one attempt
        raises (a bug, a name no resolver takes, a thread that cannot start) is
        logged once with its traceback and counts as a failed attempt: the
        supervisor backs off and dials again, it never ends but on close()."""
        while True:
            with self._cond:
                while not self._closing and not self._servers:
                    self._state = "idle"
                    self._beat_wait(TICK)
                if self._closing:
                    self._state = "idle"
                    return
                generation, servers, local = self._generation, self._servers, self._local
                index = self._next % len(servers)
                server = self._dialled = servers[index]
                settings = self.settings
                self._state = "connecting"
            try:
                up_for = self._serve_once(generation, server, local, settings, len(servers) > 1)
            except Exception as exc:
                up_for = None
                with self._cond:
                    self._link = None
                    self._up_since = None
                    self._last_error = "internal error: %s: %s" % (type(exc).__name__, exc)
                self._errors.error("internal error while serving the uplink to %s (the agent "
                                   "dials again): %s: %s", format_hostport(*server),
                                   type(exc).__name__, exc, exc_info=exc)
            with self._cond:
                if self._closing or generation != self._generation:
                    continue   # told to stop or to use new settings: no waiting
                delay = self._after_attempt(servers, index, up_for, settings)
                deadline = time.monotonic() + delay
                while not self._closing and generation == self._generation:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._beat_wait(min(remaining, TICK))

    def _after_attempt(self, servers: Tuple[HostPort, ...], index: int, up_for: Optional[float],
                       settings: DeviceSettings) -> float:
        """Under the condition: the next server to dial and how long to wait first.
        `up_for`: how long the session was up; None: there was none (a failed dial)."""
        healthy = up_for is not None and up_for >= settings.healthy_after
        self._next = index + 1
        if healthy:
            self._backoff.reset()
            self._failed = 0
        else:
            self._failed += 1
        following = format_hostport(*servers[self._next % len(servers)])
        if self._failed >= len(servers):
            # A full round without a healthy session: back off, then from the first.
            self._failed = self._next = 0
            delay = self._backoff.next_delay()
            self._state = "backoff"
            if len(servers) == 1:
                log.info("reconnecting to %s in %.1f s", following, delay)
            else:
                log.info("no server of %d kept an uplink: backing off, from the first, %s, "
                         "again in %.1f s", len(servers), format_hostport(*servers[0]), delay)
            return delay
        if up_for is None:
            log.info("trying the next server, %s", following)
            return 0.0   # the failed dial took its time already
        # A lost session: the backoff's first step after a healthy one (it was just
        # reset), reconnect_min jittered after a short one.
        delay = self._backoff.next_delay() if healthy else jittered(settings.reconnect_min)
        self._state = "backoff"
        log.info("reconnecting to %s in %.1f s", following, delay)
        return delay

    def _beat_wait(self, timeout: float) -> None:
        """Under the condition: wait, and count as alive for the watchdog."""
        self.liveness.beat(SUPERVISOR)
        self._cond.wait(timeout)
        self.liveness.beat(SUPERVISOR)

    def _serve_once(self, generation: int, server: HostPort, local: HostPort,
                    settings: DeviceSettings, several: bool) -> Optional[float]:
        """Dial and serve one uplink: the seconds it was up, None if it never was.
        `several`: one server of a list (its errors name the server)."""
        name = "uplink %s" % format_hostport(*server)
        self.liveness.beat(SUPERVISOR)
        try:
            sock = connect_tcp(server[0], server[1], settings.connect_timeout)
        except OSError as exc:
            with self._cond:
                self._last_error = "connect to %s failed: %s" % (format_hostport(*server),
                                                                  exc.strerror or exc)
            log.warning("%s", self._last_error)
            return None
        tls = self._tls
        try:
            allowed = {parse_hostport(item) for item in settings.allow}
            services = {key: parse_hostport(value) for key, value in settings.services.items()}
            link = open_device_link(sock, settings, name, local, allowed,
                                    tls and for_server(tls, settings, server[0]), services)
        except OSError as exc:
            sock.close()
            with self._cond:
                self._last_error = ("TLS with %s failed: %s" if tls else "uplink setup with %s "
                                    "failed: %s") % (format_hostport(*server), exc)
            log.warning("%s", self._last_error)
            return None
        except BaseException:
            sock.close()   # the supervisor's barrier logs it; the socket goes now
            raise
        link.loop.every(TICK, lambda: self.liveness.beat(SUPERVISOR))   # it runs in this thread
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
                self._state = "idle" if not self._servers or self._closing else "backoff"
                up_for = time.monotonic() - (self._up_since or time.monotonic())
                self._up_since = None
                if link.end_reason and generation == self._generation and not self._closing:
                    self._last_error = link.end_reason if link.role.refused or link.session.rejected \
                        else "uplink lost: %s" % link.end_reason
                    if several:   # one server of a list: say which (its log lines do)
                        self._last_error = "%s: %s" % (format_hostport(*server), self._last_error)
        return up_for
