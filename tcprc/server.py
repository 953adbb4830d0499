"""ServerSideApp: accept device uplinks, open the host port on LISTEN, carry clients.

One server serves one tunnel at a time (the legacy LISTEN names no port).
When a second device LISTENs while the host port belongs to a live uplink,
the newcomer takes over by default: a device that lost its uplink without
the server noticing (a dead cellular NAT mapping) reconnects at once
instead of being locked out until TCP gives up, the classic `ssh -R`
"remote port forwarding failed" trap.  `takeover = false` refuses the
newcomer instead.
"""

import logging
import socket
import threading
from typing import Any, Dict, List, Optional, Set, Tuple

from . import protocol
from .addr import format_hostport, parse_hostport
from .link import LimitedLog, Link
from .loop import Loop
from .pump import Stream, tune_stream_socket

log = logging.getLogger("tcprc.server")

MAX_CLIENTS = 255
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
    """Ids 1..255, handed out round-robin so a just-closed id is reused as late as possible."""

    def __init__(self) -> None:
        self._next = 1

    def allocate(self, in_use: Dict[int, Any]) -> Optional[int]:
        if len(in_use) >= MAX_CLIENTS:
            return None
        while True:
            candidate = self._next
            self._next = candidate % MAX_CLIENTS + 1
            if candidate not in in_use:
                return candidate


class ServerLink(Link):
    role = "server"

    def __init__(self, sock: socket.socket, settings: Any, name: str, app: "ServerApp"):
        super().__init__(sock, settings, name)
        self.app = app
        self.listening = False
        self.host_sock: Optional[socket.socket] = None
        self.ids = ClientIds()
        self.refusals = LimitedLog(self.log)
        self.connect_payload = protocol.encode_connect_payload(settings.connect_address,
                                                               settings.connect_port)
        self._listen_timer = None

    def on_start(self) -> None:
        self._listen_timer = self.loop.call_later(self.settings.listen_timeout, self._no_listen)

    def _no_listen(self) -> None:
        if not self.listening:
            self.fail("no LISTEN within %.1f s" % self.settings.listen_timeout)

    def on_listen(self, client_id: int, payload: memoryview) -> None:
        if self.listening:
            self.noisy.warning("%s: repeated LISTEN ignored", self.name)
            return
        self.listening = True
        self._listen_timer.cancel()
        try:
            self.host_sock = self.app.claim_host(self)
        except OSError as exc:
            self.fail("cannot open host port %s: %s" % (self.settings.host, exc.strerror or exc))
            return
        if self.host_sock is None:
            self.fail("host port %s belongs to a live uplink (takeover = false)" % self.settings.host)
            return
        self.loop.set_handlers(self.host_sock, self._accept, None)
        self.log.info("%s: LISTEN: clients accepted on %s", self.name,
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
            self.log.debug("%s: DATA for unknown client %d dropped", self.name, client_id)

    def _accept(self) -> None:
        try:
            client, peer = self.host_sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.refusals.warning("%s: accept failed: %s", self.name, exc.strerror or exc)
            return
        who = format_hostport(*peer[:2])
        client_id = self.ids.allocate(self.streams)
        if client_id is None:
            self.refusals.warning("%s: refused client %s: all %d client ids of this tunnel are in use",
                                  self.name, who, MAX_CLIENTS)
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

    # ---- lifecycle --------------------------------------------------------------
    def start(self) -> None:
        """Bind the uplink port (errors raise OSError here, at start) and serve it."""
        self._listener = bind_listener(parse_hostport(self.settings.listen, allow_zero_port=True))
        self.listen_address = self._listener.getsockname()[:2]
        self._loop.set_handlers(self._listener, self._accept_uplink, None)
        self._thread = threading.Thread(target=self._loop.run, name="tcprc-server", daemon=True)
        self._thread.start()
        log.info("waiting for devices on %s", format_hostport(*self.listen_address))

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
        self.settings = settings
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
            log.warning("accept on the uplink port failed: %s", exc.strerror or exc)
            return
        who = format_hostport(*peer[:2])
        with self._lock:
            waiting = sum(1 for link in self._links if not link.listening)
        if waiting >= self.settings.max_pending:
            log.warning("uplink from %s refused: %d connections already wait for their LISTEN",
                        who, waiting)
            sock.close()
            return
        sock.setblocking(True)
        link = ServerLink(sock, self.settings, "uplink %s" % who, self)
        thread = threading.Thread(target=self._serve, args=(link,), name="tcprc-uplink", daemon=True)
        with self._lock:
            self._links.add(link)
        log.info("uplink from %s accepted", who)
        thread.start()

    def _serve(self, link: ServerLink) -> None:
        try:
            link.run()
        finally:
            with self._lock:
                self._links.discard(link)
                if link.listening and link.end_reason:
                    self._last_error = "%s: %s" % (link.name, link.end_reason)

    def claim_host(self, link: ServerLink) -> Optional[socket.socket]:
        """Link thread, on LISTEN: the host listener for `link`, or None when refused."""
        with self._claim_lock:
            with self._lock:
                current = self._active
            if current is not None:
                if not self.settings.takeover:
                    return None
                log.warning("%s replaces %s as the tunnel's uplink", link.name, current.name)
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
