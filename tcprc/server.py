"""ServerSideApp: accept device uplinks, open the host port on LISTEN, carry clients.

One server serves one tunnel at a time (the legacy LISTEN names no port).
When a second device LISTENs while the host port belongs to a live uplink,
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
import struct
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

from . import protocol
from .addr import address_in, format_hostport, parse_hostport, parse_network, source_key
from .link import LimitedLog, Link, SourceLog
from .loop import Loop
from .pump import Stream, tune_stream_socket

log = logging.getLogger("tcprc.server")

MAX_CLIENTS = 255
SCORE_LIMIT = 3
# A held id's grace: a floor for the device's own delay in reading our CLOSE,
# plus this many smoothed round trips of the uplink.
GRACE_FLOOR = 0.05
GRACE_RTTS = 4
HostPort = Tuple[str, int]


def bind_listener(address: HostPort, backlog: int = 128) -> socket.socket:
    host, port = address
    host = host or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ClientIds:
    """Ids 1..255, handed out round-robin so a just-closed id is reused as late as possible.

    An id this side closed first is held: a legacy Lua device answers our
    CLOSE with its own, maybe after DATA it still had for the old stream, and
    that must not reach the id's next client.  A device seen to answer holds
    the id until its CLOSE comes (at most `quarantine` seconds); one not seen
    to (a tcprc device never answers) only for the `grace` given at close, the
    time DATA it sent before reading our CLOSE may take to arrive.
    """

    def __init__(self, quarantine: float = 10.0) -> None:
        self._next = 1
        # After a failed allocate: seconds until a held id frees, when a client
        # should wait that long; 0.0: refuse it.
        self.wait = 0.0
        self.quarantine = quarantine
        self._held: Dict[int, Tuple[float, float]] = {}   # id -> (closed at, grace)
        # Answers seen minus ids reused unanswered, within +-SCORE_LIMIT: one CLOSE
        # that merely crossed ours does not turn a tcprc device into an answerer.
        self._score = 0

    @property
    def answering(self) -> bool:
        return self._score > 0

    def hold(self, client_id: int, now: float, grace: float) -> None:
        self._held[client_id] = (now, grace)

    def answer(self, client_id: int, closing: bool = False) -> bool:
        """The device's CLOSE for an id not open here: True when it answers ours.

        `closing`: our CLOSE went out but the stream is still winding up.
        An answer after the hold ran out still counts, until the id is reused.
        """
        if self._held.pop(client_id, None) is None and not closing:
            return False
        self._score = min(self._score + 1, SCORE_LIMIT)
        return True

    def is_held(self, client_id: int) -> bool:
        return client_id in self._held

    def allocate(self, in_use: Dict[int, Any], now: Optional[float] = None) -> Optional[int]:
        """A free id, or None (then `wait` says whether to wait or refuse)."""
        self.wait = 0.0
        if len(in_use) >= MAX_CLIENTS:
            return None
        if now is None:
            now = time.monotonic()
        answering = self._score > 0
        soonest = 0.0
        for _ in range(MAX_CLIENTS):
            candidate = self._next
            self._next = candidate % MAX_CLIENTS + 1
            if candidate in in_use:
                continue
            held = self._held.get(candidate)
            if held is not None:
                closed_at, grace = held
                left = closed_at + (max(grace, self.quarantine) if answering else grace) - now
                if left > 0:
                    soonest = left if not soonest else min(soonest, left)
                    continue
                del self._held[candidate]   # a CLOSE for it from now on is the new client's
                self._score = max(self._score - 1, -SCORE_LIMIT)
            return candidate
        # Only held ids are free: a grace of a few round trips is worth waiting
        # for; an answering device's quarantine is not.
        if not answering:
            self.wait = soonest
        return None

    def held_count(self) -> int:
        return len(self._held)


class ServerLink(Link):
    role = "server"

    def __init__(self, sock: socket.socket, settings: Any, name: str, app: "ServerApp",
                 host: str = ""):
        super().__init__(sock, settings, name)
        self.app = app
        self.host = host                   # the source address, for allow_from
        self.source = source_key(host)     # what per-source limits count
        self.noisy = app.uplink_log.of(self.source)
        self.evicted = False
        self.listening = False
        self.host_sock: Optional[socket.socket] = None
        self.ids = ClientIds(settings.id_quarantine)
        self._accept_paused = False
        self.refusals = LimitedLog(self.log)
        self.connect_payload = protocol.encode_connect_payload(settings.connect_address,
                                                               settings.connect_port)
        self._listen_timer = None

    def on_start(self) -> None:
        self._listen_timer = self.loop.call_later(self.settings.listen_timeout, self._no_listen)

    def _no_listen(self) -> None:
        if not self.listening:
            self.fail("no LISTEN within %.1f s" % self.settings.listen_timeout)

    def evict(self, reason: str) -> None:
        """Thread-safe: drop this uplink unless its LISTEN got in first."""
        def drop() -> None:
            if not self.listening:
                self.evicted = True
                self.fail(reason)
        self.loop.call_soon(drop)

    def log_closed(self) -> None:
        level = logging.WARNING if self.evicted else logging.INFO
        self.app.uplink_log.log(self.source, level, "%s: uplink closed: %s",
                                self.name, self.end_reason or "stopped")

    def on_listen(self, client_id: int, payload: memoryview) -> None:
        if self.listening:
            self.noisy.warning("%s: repeated LISTEN ignored", self.name)
            return
        self.listening = True
        self._listen_timer.cancel()
        self.app.listened(self)
        try:
            self.host_sock = self.app.claim_host(self)
        except OSError as exc:
            self.fail("cannot open host port %s: %s" % (self.settings.host, exc.strerror or exc))
            return
        if self.host_sock is None:
            self.fail("host port %s belongs to a live uplink (takeover = false)" % self.settings.host)
            return
        self.loop.set_handlers(self.host_sock, self._accept, None)
        self.app.uplink_log.info(self.source, "%s: LISTEN: clients accepted on %s", self.name,
                                 format_hostport(*self.host_sock.getsockname()[:2]))

    def _before_listen(self, what: str) -> bool:
        if self.listening:
            return False
        self.fail("%s before LISTEN: not a tcprc device" % what)
        return True

    def on_connect(self, client_id: int, payload: memoryview) -> None:
        if not self._before_listen("CONNECT"):
            super().on_connect(client_id, payload)

    def on_unknown_data(self, client_id: int, payloads: List[memoryview]) -> None:
        # Late DATA for a client this side closed: the device gets our CLOSE anyway.
        if not self._before_listen("DATA"):
            self.log.debug("%s: DATA for unknown client %d dropped%s", self.name, client_id,
                           " (held until the device's CLOSE)" if self.ids.is_held(client_id) else "")

    # ---- ids this side closed: held until the device's CLOSE ---------------------
    def on_unknown_close(self, client_id: int) -> None:
        if self.ids.answer(client_id):
            self.log.debug("%s: CLOSE for client %d answers ours: the id is free", self.name, client_id)
        else:
            super().on_unknown_close(client_id)

    def on_close_answered(self, client_id: int) -> None:
        self.ids.answer(client_id, closing=True)

    def pump_exited(self, stream: Stream, reason: str) -> None:
        ours = self.streams.get(stream.id) is stream   # still listed: its pump sent CLOSE
        super().pump_exited(stream, reason)
        if ours:
            self.ids.hold(stream.id, time.monotonic(), self._grace())

    def close_stream(self, stream: Stream, reason: str, notify_peer: bool = True) -> None:
        ours = notify_peer and self.streams.get(stream.id) is stream
        super().close_stream(stream, reason, notify_peer)
        if ours:
            self.ids.hold(stream.id, time.monotonic(), self._grace())

    def _grace(self) -> float:
        """How long DATA the device sent before it read our CLOSE may still arrive."""
        try:
            info = self.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
            rtt = struct.unpack_from("=I", info, 68)[0] / 1e6   # tcpi_rtt, microseconds
        except (AttributeError, OSError, struct.error):
            rtt = 0.0
        return GRACE_FLOOR + GRACE_RTTS * rtt

    def _resume_accept(self) -> None:
        self._accept_paused = False
        if self.host_sock is not None and not self.end_reason:
            self.loop.set_handlers(self.host_sock, self._accept, None)

    def _accept(self) -> None:
        client_id = self.ids.allocate(self.streams)
        if client_id is None and self.ids.wait:
            # Clients wait in the backlog until the first id's grace ends.
            if not self._accept_paused:
                self._accept_paused = True
                self.loop.forget(self.host_sock)
                self.loop.call_later(self.ids.wait, self._resume_accept)
            return
        try:
            client, peer = self.host_sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.refusals.warning("%s: accept failed: %s", self.name, exc.strerror or exc)
            return
        who = format_hostport(*peer[:2])
        if client_id is None:
            held = self.ids.held_count()
            self.refusals.warning("%s: refused client %s: all %d client ids of this tunnel are in use%s",
                                  self.name, who, MAX_CLIENTS,
                                  " (%d closed, awaiting the device's CLOSE)" % held if held else "")
            client.close()
            return
        client.setblocking(True)
        tune_stream_socket(client)
        stream = Stream(client_id, who)
        stream.sock = client
        self.log.info("%s: client %d (%s) connected", self.name, client_id, who)
        # CONNECT is queued before the pump starts, so it precedes the client's DATA.
        self.post(protocol.CONNECT, client_id, self.connect_payload)
        self.open_stream(stream)

    def on_teardown(self) -> None:
        if self.host_sock is not None:
            self.loop.forget(self.host_sock)
            self.host_sock.close()
            self.host_sock = None
        self.app.release_host(self)


class ServerApp:
    def __init__(self, settings: Any):
        self.settings = settings
        self.listen_address: Optional[HostPort] = None
        self.host_address: Optional[HostPort] = None
        self._lock = threading.Lock()
        self._claim_lock = threading.Lock()
        self._active: Optional[ServerLink] = None
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

    def apply_settings(self, settings: Any) -> None:
        """New settings: a changed listen port cannot move without a restart; say so."""
        if settings.listen != self.settings.listen:
            log.warning("listen address change to %s needs a restart; still on %s",
                        settings.listen, self.settings.listen)
        changed = settings.host != self.settings.host or settings.connect_port != self.settings.connect_port \
            or settings.connect_address != self.settings.connect_address
        allow_changed = settings.allow_from != self.settings.allow_from
        self.settings = settings
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
                active = self._active
            if active is not None:
                active.stop("settings changed")

    def status(self) -> Dict[str, Any]:
        with self._lock:
            link = self._active
            up, down = self._totals
            stats = link.stats() if link is not None else None
            return {
                "state": "up" if link is not None else "waiting",
                "listen": format_hostport(*self.listen_address) if self.listen_address else "",
                "host": format_hostport(*self.host_address) if self.host_address else "",
                "device": link.name if link is not None else "",
                "clients": stats["clients"] if stats else 0,
                "bytes_up": up + (stats["bytes_received"] if stats else 0),
                "bytes_down": down + (stats["bytes_sent"] if stats else 0),
                "uptime": stats["uptime"] if stats else None,
                "last_error": self._last_error,
            }

    # ---- uplinks ------------------------------------------------------------------
    def _accept_uplink(self) -> None:
        try:
            sock, peer = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._accept_errors.warning("accept on the uplink port failed: %s", exc.strerror or exc)
            return
        who = format_hostport(*peer[:2])
        if not address_in(peer[0], self._allow):
            sock.close()
            self.uplink_log.warning(source_key(peer[0]), "uplink from %s refused: not in allow_from", who)
            return
        sock.setblocking(True)
        link = ServerLink(sock, self.settings, "uplink %s" % who, self, peer[0])
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
            link.run()
        finally:
            with self._lock:
                self._links.discard(link)
                self._pending.pop(link, None)
                if link.listening and link.end_reason:
                    self._last_error = "%s: %s" % (link.name, link.end_reason)

    def claim_host(self, link: ServerLink) -> Optional[socket.socket]:
        """Link thread, on LISTEN: the host listener for `link`, or None when refused."""
        with self._claim_lock:
            with self._lock:
                current = self._active
            if current is not None:
                if not self.settings.takeover:
                    self.uplink_log.warning(link.source, "%s: LISTEN refused: the tunnel belongs to %s "
                                            "(takeover = false)", link.name, current.name)
                    return None
                self.uplink_log.warning(link.source, "%s: LISTEN takes over the tunnel from %s",
                                        link.name, current.name)
                current.stop("replaced by %s" % link.name)
                current.wait_stopped(5)
            sock = bind_listener(parse_hostport(self.settings.host, allow_zero_port=True))
            with self._lock:
                self._active = link
                self.host_address = sock.getsockname()[:2]
            return sock

    def release_host(self, link: ServerLink) -> None:
        with self._lock:
            if self._active is link:
                stats = link.stats()
                self._totals[0] += stats["bytes_received"]
                self._totals[1] += stats["bytes_sent"]
                self._active = None
                self.host_address = None
