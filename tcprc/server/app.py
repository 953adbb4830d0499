"""ServerApp: accept device uplinks, open the host port on LISTEN, carry clients.

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
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from ..addr import address_in, format_hostport, parse_hostport, parse_network, source_key
from ..engine.link import LimitedLog, SourceLog
from ..engine.loop import Loop
from ..engine.sockets import accept_nowait, bind_listener
from .link import HANDOVER, ServerLink, open_server_link
from ..settings import ServerSettings

log = logging.getLogger("tcprc.server")

HostPort = Tuple[str, int]


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
        self.host_address: Optional[HostPort] = None
        self._lock = threading.Lock()
        self._active: Optional[ServerLink] = None      # holds the host port
        self._successor: Optional[ServerLink] = None   # LISTENed; gets the port next
        # The host listener: ours to open and close; the active link watches it.
        self._host_sock: Optional[socket.socket] = None
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

    def apply_settings(self, settings: ServerSettings) -> None:
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
            link = open_server_link(sock, self.settings, "uplink %s" % who, self, peer[0])
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
            link.run()
        finally:
            with self._lock:
                self._links.discard(link)
                self._pending.pop(link, None)
                if link.listening and link.end_reason:
                    self._last_error = "%s: %s" % (link.name, link.end_reason)

    def claim_host(self, link: ServerLink) -> Any:
        """Link thread, on LISTEN: the host listener for `link`; None when refused;
        HANDOVER when a live uplink holds it: that one is told to stop, and its
        teardown hands the port to `link` (release_host).  Never waits."""
        with self._lock:
            current = self._active
            if current is None:
                sock = bind_listener(parse_hostport(self.settings.host, allow_zero_port=True))
                self._active, self._host_sock = link, sock
                self.host_address = sock.getsockname()[:2]
                return sock
            if not self.settings.takeover:
                refused = True
            else:
                refused = False
                waiting, self._successor = self._successor, link
        if refused:
            self.uplink_log.warning(link.source, "%s: LISTEN refused: the tunnel belongs to %s "
                                    "(takeover = false)", link.name, current.name)
            return None
        self.uplink_log.warning(link.source, "%s: LISTEN takes over the tunnel from %s",
                                link.name, current.name)
        current.stop("replaced by %s" % link.name)
        if waiting is not None:   # an earlier newcomer still waiting: this one wins
            waiting.stop("replaced by %s" % link.name)
        return HANDOVER

    def release_host(self, link: ServerLink) -> None:
        """Link thread, at teardown (no longer watching the host listener): the
        listener is closed, and the port goes to the uplink waiting for it, if
        any, through that uplink's own loop."""
        with self._lock:
            if self._successor is link:
                self._successor = None   # it ended while waiting
                return
            if self._active is not link:
                return
            stats = link.stats()
            self._totals[0] += stats["bytes_received"]
            self._totals[1] += stats["bytes_sent"]
            self._active = None
            self.host_address = None
            if self._host_sock is not None:
                self._host_sock.close()
                self._host_sock = None
            successor, self._successor = self._successor, None
            if successor is None:
                return
            sock, error = None, None
            try:
                sock = bind_listener(parse_hostport(self.settings.host, allow_zero_port=True))
            except OSError as exc:
                error = exc
            else:
                self._active, self._host_sock = successor, sock
                self.host_address = sock.getsockname()[:2]
        successor.loop.call_soon(lambda: successor.host_ready(sock, error))
