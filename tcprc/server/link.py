"""ServerLink: the server's role on one uplink: an established session opens its host
port, a stream per accepted client.

A legacy session (LISTEN, then no answer to our OFFER) gets [server] host;
a v2 session gets the host of the device id it authenticated as, or
[server] host when it has no identity and legacy sessions are allowed.

The protocol is the ServerSession's (wire.session) and the engine's Link
drives it; a ServerLink is the role handed to that link (engine.role): it
handles the session's Listened, Authed, Denied and Unlisten, holds the
uplink's listeners and accepts their clients.  The app holds ServerLinks;
what it asks of the uplink itself (stop, stats, run) passes through.
"""

import logging
import socket
import struct
import time
from typing import Any, Callable, Dict, NamedTuple, Optional

from ..addr import format_hostport, source_key
from ..engine.link import Link
from ..engine.loop import Loop
from ..engine.ratelog import LimitedLog
from ..engine.role import Role
from ..engine.sockets import accept_nowait, tune_stream_socket, tune_uplink_socket
from ..engine.stream import Stream
from ..engine.transport import PlainTransport, Transport, looks_like_tls
from ..wire import frames as protocol
from ..wire.actions import Authed, Denied, Listened, Unlisten
from ..wire.server_session import ServerSession
from ..wire.states import SessionState
from .ids import MAX_CLIENTS, ClientIds
from .fleet import FIGHT_LIMIT, FIGHT_WINDOW
from .ports import HANDOVER, Ports
from ..settings import ServerSettings

class LinkParts(NamedTuple):
    """What a ServerLink needs of the server, as narrow objects (never the app)."""
    ports: Ports                           # the host and service ports (server.ports)
    fleet: Any                             # the devices and their records (server.fleet.Fleet)
    auth: Any                              # failed and passed handshakes (server.auth.Auth)
    uplink_log: Any                        # lines about uplinks, rate-limited per source
    established: Callable[[Any], None]     # a session is established: it waits no more
    cluster: Any = None                    # the registry (claim, release), with [cluster]

# How long the PONG of a PING may take when another server says it holds our
# device now: none in time, and this uplink is stale; one, and the id is cloned.
TAKEOVER_PING = 1.0


class ServerLink(Role):
    log_name = "server"

    def __init__(self, transport: Transport, loop: Loop, session: ServerSession,
                 settings: ServerSettings, name: str, parts: LinkParts, host: str = ""):
        self.parts = parts
        self.ports = parts.ports
        self.fleet = parts.fleet
        self.settings = settings
        self.session = session
        self.ids = session.ids
        self.host = host                   # the source address, for allow_from
        self.source = source_key(host)     # what per-source limits count
        self.evicted = False
        self.host_sock: Optional[socket.socket] = None
        # Every listener this link accepts on -> the CONNECT payload its clients
        # get (None: the session's own, for host_sock); services by name.
        self._connects: Dict[socket.socket, Optional[bytes]] = {}
        self.services: Dict[str, socket.socket] = {}
        self._accept_paused = False
        self._listen_timer: Any = None
        self.record: Any = None            # its device's record (server.fleet), once up
        self.claim: Any = None             # its claim in the cluster's registry, once up
        self.link = Link(transport, loop, session, settings, name, self)
        self.link.noisy = parts.uplink_log.of(self.source)
        self.refusals = LimitedLog(self.link.log)

    # ---- what the app asks of the uplink ---------------------------------------------------
    @property
    def name(self) -> str:
        return self.link.name

    @property
    def started(self) -> float:
        return self.link.started

    @property
    def end_reason(self) -> str:
        return self.link.end_reason

    @property
    def transport(self) -> Transport:
        return self.link.transport

    @property
    def loop(self) -> Loop:
        return self.link.loop

    @property
    def sock(self) -> Optional[socket.socket]:
        return self.link.sock

    @property
    def streams(self) -> Dict[int, Stream]:
        return self.link.streams

    def run(self) -> None:
        self.link.run()

    def stop(self, reason: str) -> None:
        self.link.stop(reason)

    def wait_stopped(self, timeout: Optional[float] = None) -> bool:
        return self.link.wait_stopped(timeout)

    def discard(self) -> None:
        self.link.discard()

    def stats(self) -> Dict[str, Any]:
        return self.link.stats()

    @property
    def v2(self) -> bool:
        return self.session.v2

    @property
    def held_by_throttle(self) -> bool:
        """Its CHALLENGE waits: the id it named failed from its source lately."""
        return self.session.held

    @property
    def listening(self) -> bool:
        """The session is established (legacy, or v2 past its handshake): it has clients."""
        return self.session.established

    @property
    def device_id(self) -> str:
        """The id this session authenticated as ("" : none)."""
        return self.session.authenticated_id

    # ---- the role --------------------------------------------------------------------------------
    def attach(self, link: Link) -> Dict[type, Callable[[Any], None]]:
        if not link.transport.buffers:   # plain: the first read checks for a TLS client
            link.set_reader(self._first_read)
        return {Listened: lambda action: self._claim(), Authed: self._authenticated,
                Denied: self._denied, Unlisten: lambda action: self._unlisten()}

    def eof_reason(self, default: str) -> str:
        if self.transport.buffers and not self.session.listening and not self.link.writer.error:
            # TLS 1.3 ends the server's handshake before the device checked our
            # certificate against its pin: its verdict is this close.
            return ("the device closed the TLS session before its LISTEN (it may have refused "
                    "our certificate: a pin, or a name it does not accept)")
        return default

    def silent_close(self, reset: bool) -> Optional[str]:
        if self.transport.buffers and not self.session.listening:
            return self.eof_reason("")
        return None

    def _first_read(self) -> None:
        """A device configured for TLS, on this plaintext port: say so at once
        (its ClientHello would otherwise wait as a partial frame)."""
        try:
            first = self.transport.sock.recv(3, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            first = b""
        if looks_like_tls(first):
            self.link.fail("the device speaks TLS, this uplink port is plaintext (set [server] "
                           "tls_cert and tls_key, or [device] tls = false)")
            return
        self.link.read_frames()

    def on_start(self) -> None:
        self._listen_timer = self.loop.call_later(self.settings.listen_timeout, self._no_listen)

    def _no_listen(self) -> None:
        if self.listening:
            return
        partial = self.link.frames.incomplete_frame()
        if partial and self.session.listening:
            self.link.fail("handshake not done within %.1f s (%s)"
                           % (self.settings.listen_timeout, partial))
            return
        self.link.act(self.session.timed_out(self.settings.listen_timeout))

    def evict(self, reason: str) -> None:
        """Thread-safe: drop this uplink unless its session got established first.
        One still in its TLS handshake (no loop running yet) is cut at once."""
        if self.transport.buffers and not self.session.listening:
            self.evicted = True
            self.link.end_reason = self.link.end_reason or reason
            self.transport.shutdown()

        def drop() -> None:
            if not self.listening:
                self.evicted = True
                self.link.fail(reason)
        self.loop.call_soon(drop)

    def log_closed(self) -> None:
        level = logging.WARNING if self.evicted else logging.INFO
        self.parts.uplink_log.log(self.source, level, "%s: uplink closed: %s",
                                self.name, self.end_reason or "stopped")

    def _authenticated(self, action: Authed) -> None:
        """A v2 session passed its handshake: its device's host port, then WELCOME.

        With [server] tls_client_ca, the certificate the device showed must name
        the id it proved: a stolen certificate does not open another's port."""
        device_id = action.device_id
        if self.parts.auth.client_certificates and device_id:
            from ..engine.tls import peer_identity
            named = peer_identity(self.transport)
            if named != device_id:
                message = "its certificate names %s, not %s" % (named or "nobody", device_id)
                self.parts.auth.failed(self, device_id, message)
                self.link.act(self.session.reject(protocol.REJECT_BAD_PROOF, message))
                return
        if device_id:
            self.parts.auth.passed(self, device_id)
            cooling = self.fleet.cooling(device_id, time.monotonic())
            if cooling and self.parts.cluster is not None:
                message = ("device %s answered on two nodes %d times in %g s (a cloned "
                           "identity?): its sessions are refused here for %.0f s more"
                           % (device_id, FIGHT_LIMIT, FIGHT_WINDOW, cooling))
                self.link.noisy.warning("%s: %s", self.name, message)
                self.link.act(self.session.reject(protocol.REJECT_IDENTITY_CONFLICT, message))
                return
        self._claim()

    def _denied(self, action: Denied) -> None:
        self.parts.auth.failed(self, action.device_id, action.message)

    def _unlisten(self) -> None:
        """A HELLO after the legacy wait, before any client: the port goes back, and
        the handshake gets the listen timeout again."""
        if self.host_sock is not None:
            self.loop.forget(self.host_sock)
            self._connects.pop(self.host_sock, None)
            self.host_sock = None
        self.ports.release(self)
        self._listen_timer = self.loop.call_later(self.settings.listen_timeout, self._no_listen)

    @property
    def wanted_host(self) -> str:
        return self.fleet.host_for(self.device_id)

    def _claim(self) -> None:
        self._listen_timer.cancel()
        self.parts.established(self)
        try:
            sock = self.ports.claim_host(self, self.device_id, self.wanted_host)
        except OSError as exc:
            self._refuse("cannot open host port %s: %s" % (self.wanted_host, exc.strerror or exc),
                         protocol.REJECT_SERVER_ERROR)
            return
        if sock is None:
            self._refuse("host port %s belongs to a live uplink (takeover = false)"
                         % self.wanted_host, protocol.REJECT_HOST_BUSY)
        elif sock is not HANDOVER:
            self.host_ready(sock, None)
        # HANDOVER: the uplink that holds the port was told to stop; its
        # teardown hands the port over through host_ready, in this thread.

    def _refuse(self, reason: str, code: int) -> None:
        """The session cannot have its host port: REJECT `code` (v2), or the end."""
        if self.session.state is SessionState.AUTHED:
            self.link.act(self.session.reject(code, reason))
        else:
            self.link.fail(reason)

    def host_ready(self, sock: Optional[socket.socket], error: Optional[OSError]) -> None:
        """Link thread: the host port is ours (or could not be opened: `error`)."""
        if sock is None:
            exc = error or OSError("no host port")
            self._refuse("cannot open host port %s: %s" % (self.wanted_host, exc.strerror or exc),
                         protocol.REJECT_SERVER_ERROR)
            return
        if self.link.ending:
            return   # ending already: the ports' release closes the listener (they own it)
        self.host_sock = sock
        bound = format_hostport(*self.host_sock.getsockname()[:2])
        if self.session.state is SessionState.AUTHED:
            self.link.act(self.session.welcome(bound))
            if self.end_reason:
                return
        self._connects[self.host_sock] = None
        self._watch(self.host_sock)
        self.fleet.session_up(self)
        if self.parts.cluster is not None and self.v2 and self.device_id:
            # The cluster's other servers forward this device's clients here now.
            self.claim = self.parts.cluster.claim(self.device_id, self.name.split(" ", 1)[-1])
        self.parts.uplink_log.info(self.source, "%s: %s: clients accepted on %s", self.name,
                                 "v2 session of %s" % (self.device_id or "a device without id")
                                 if self.v2 else "LISTEN", bound)
        self.sync_services()

    def sync_services(self) -> None:
        """Link thread: the ports of its device's named services (v2 with an id only),
        as configured now: removed or moved ones closed, new ones opened.  Their
        clients get a CONNECT to "service:NAME", port 0; open streams stay."""
        if not (self.v2 and self.device_id) or self.host_sock is None or self.link.ending:
            return
        wanted = self.fleet.services_of(self.device_id)
        log = self.link.log
        for name in sorted(self.services):
            if self.ports.service_host(self, self.device_id, name) != wanted.get(name):
                sock = self.services.pop(name)
                self.loop.forget(sock)
                del self._connects[sock]
                self.ports.release_service(self, self.device_id, name)   # closes it
                log.info("%s: service %s closed", self.name, name)
        for name in sorted(set(wanted) - set(self.services)):
            try:
                sock = self.ports.claim_service(self, self.device_id, name, wanted[name])
            except OSError as exc:
                self.link.noisy.warning("%s: service %s: cannot open host port %s: %s",
                                        self.name, name, wanted[name], exc.strerror or exc)
                continue
            if sock is None:
                continue   # the ports said why
            self.services[name] = sock
            self._connects[sock] = protocol.encode_connect_payload(
                protocol.SERVICE_PREFIX + name, 0)
            self._watch(sock)
            log.info("%s: service %s: clients accepted on %s", self.name, name,
                     format_hostport(*sock.getsockname()[:2]))

    def _watch(self, listener: socket.socket) -> None:
        if not self._accept_paused:
            self.loop.set_handlers(listener, lambda: self._accept(listener), None)

    def _resume_accept(self) -> None:
        self._accept_paused = False
        if self.host_sock is not None and not self.end_reason:
            for listener in self._connects:
                self._watch(listener)

    def _accept(self, listener: socket.socket) -> None:
        link = self.link
        # At 255 the ids run out first: that refusal says more (held ids).
        if len(link.streams) >= self.settings.max_streams_per_device < MAX_CLIENTS:
            self._refuse_client(listener, "%d clients are open (max_streams_per_device)"
                                % len(link.streams))
            return
        client_id, announce = self.session.open(link.streams, time.monotonic(),
                                                self._connects.get(listener))
        if client_id is None and self.ids.wait:
            # Clients wait in the backlog until the first id's grace ends.
            if not self._accept_paused:
                self._accept_paused = True
                for other in self._connects:
                    self.loop.forget(other)
                self.loop.call_later(self.ids.wait, self._resume_accept)
            return
        if client_id is None:
            held = self.ids.held_count()
            self._refuse_client(listener, "all %d client ids of this tunnel are in use%s" % (
                MAX_CLIENTS, " (%d closed, awaiting the device's CLOSE)" % held if held else ""))
            return
        client, peer = self._accept_one(listener)
        if client is None:
            return
        service = "" if listener is self.host_sock else \
            " to service %s" % next((n for n, s in self.services.items() if s is listener), "?")
        self._take_client(client_id, announce, client, format_hostport(*peer[:2]), service)

    def _take_client(self, client_id: int, announce: Any, client: socket.socket, who: str,
                     service: str) -> None:
        """A client of this device's session on `client_id`: its CONNECT (`announce`),
        its stream and its pump."""
        link = self.link
        tune_stream_socket(client)
        stream = link.new_stream(client_id, who)
        stream.sock = client
        link.log.info("%s: client %d (%s) connected%s", self.name, client_id, who, service)
        # CONNECT is queued before the pump starts, so it precedes the client's DATA.
        link.act(announce)
        link.open_stream(stream)

    def adopt(self, client: socket.socket, who: str, service: str = "") -> None:
        """Link thread: a client accepted elsewhere (on a port kept open for the cluster,
        or forwarded by another server) is one of this device's own: the same limits,
        the same CONNECT as on its own port.  Closed at once if it cannot be."""
        link = self.link
        payload = None if not service else protocol.encode_connect_payload(
            protocol.SERVICE_PREFIX + service, 0)
        why = ""
        if link.ending or self.host_sock is None:
            why = "its session is ending"
        elif service and service not in self.services:
            why = "no service %s here" % service
        elif len(link.streams) >= self.settings.max_streams_per_device:
            why = "%d clients are open (max_streams_per_device)" % len(link.streams)
        if not why:
            client_id, announce = self.session.open(link.streams, time.monotonic(), payload)
            if client_id is not None:
                self._take_client(client_id, announce, client, who,
                                  " to service %s" % service if service else "")
                return
            why = "no client id is free"
        client.close()
        self.fleet.client_refused(self)
        self.refusals.warning("%s: refused client %s: %s", self.name, who, why)

    def check_taken_over(self, node: str) -> None:
        """Link thread: server `node` says it holds our device now.  A stale uplink (a
        device gone without a word) does not answer a PING in TAKEOVER_PING: it
        ends.  One that answers means two devices with one id (a cloned identity):
        counted and logged; the newer session, the other server's, is kept."""
        def answered(alive: bool) -> None:
            if alive:
                self.fleet.fought(self, time.monotonic())
                self.parts.uplink_log.warning(
                    self.source, "%s: device %s also holds a session on node %s, and this one "
                    "answers too: a cloned identity (two devices with one id and secret?); "
                    "the newer session, node %s's, is kept", self.name, self.device_id, node,
                    node)
            self.link.fail("taken over by node %s" % node if not alive else
                           "a newer session of device %s on node %s (cloned identity)"
                           % (self.device_id, node))
        self.link.probe(TAKEOVER_PING, answered)

    def _accept_one(self, listener: socket.socket) -> Any:
        """(client, peer) from `listener`, or (None, None): nobody waiting, or an
        accept error (rate-limited line)."""
        try:
            accepted = accept_nowait(listener)
        except OSError as exc:
            self.refusals.warning("%s: accept failed: %s", self.name, exc.strerror or exc)
            return None, None
        return accepted if accepted is not None else (None, None)

    def _refuse_client(self, listener: socket.socket, why: str) -> None:
        client, peer = self._accept_one(listener)
        if client is None:
            return
        # Counted and logged before the close: whoever sees the hang-up finds both.
        self.fleet.client_refused(self)
        self.refusals.warning("%s: refused client %s: %s", self.name,
                              format_hostport(*peer[:2]), why)
        client.close()

    def on_stream_refused(self, stream: Stream) -> None:
        self.fleet.client_refused(self)

    def on_stream_failed(self, stream: Stream, code: int, text: str) -> None:
        if not protocol.CLOSE_REFUSED <= code <= protocol.CLOSE_NOT_ALLOWED:
            super().on_stream_failed(stream, code, text)
            return
        self.link.log.warning("%s: client %d (%s): the device could not open it: %s%s",
                              self.name, stream.id, stream.peer,
                              protocol.close_reason_name(code), ": " + text if text else "")

    def on_upgraded(self, detail: str) -> None:
        pass   # host_ready says it, with the port

    def on_teardown(self) -> None:
        for listener in self._connects:
            self.loop.forget(listener)
        self._connects.clear()
        self.services.clear()
        self.host_sock = None   # the ports close them all
        self.ports.release(self)
        if self.claim is not None:
            self.parts.cluster.release(self.claim)   # never a newer claim than ours


def open_server_link(sock: socket.socket, settings: ServerSettings, name: str, parts: LinkParts,
                     host: str, tls: Any = None) -> ServerLink:
    """A ServerLink over an accepted uplink socket, with its parts: the socket
    tuned and wrapped in a transport (TLS when `tls` is a context: its
    handshake is the link thread's, ServerApp._serve), a loop and a session."""
    tune_uplink_socket(sock, settings)
    if tls is None:
        transport: Transport = PlainTransport(sock)
    else:
        from ..engine.tls import TlsTransport
        transport = TlsTransport(sock, tls)
    source = source_key(host)
    session = ServerSession(
        ClientIds(settings.id_quarantine),
        protocol.encode_connect_payload(settings.connect_address, settings.connect_port),
        lambda: _rtt(transport), lookup=parts.fleet.secret_of, legacy_allowed=settings.legacy,
        window=settings.window,
        throttle=lambda now, device_id: parts.auth.delay(source, device_id, now),
        heartbeat=(settings.heartbeat_interval, settings.heartbeat_timeout))
    return ServerLink(transport, Loop(), session, settings, name, parts, host)


def _rtt(transport: Transport) -> float:
    """The uplink's smoothed round trip in seconds (0.0 when unknown): the
    session holds a closed id for a few of them."""
    info = transport.tcp_info(104)
    try:
        return struct.unpack_from("=I", info, 68)[0] / 1e6   # tcpi_rtt, microseconds
    except (TypeError, struct.error):
        return 0.0
