"""The device's role on its uplink: dial what a CONNECT asks, within the target policy.

The protocol (LISTEN first, early DATA held until its CONNECT, quiet ids, a
CONNECT on a busy id, version 2) is the DeviceSession's (wire.session) and
the link (engine.link) drives it; this role adds what needs the device's
I/O: the target policy's dialing (OpenLocal), and telling a refusal from a
lost uplink.
"""

import logging
import socket
import time
from typing import Any, Callable, Dict, Optional, Set, Tuple

from ..addr import format_hostport
from ..engine.link import Link
from ..engine.loop import Loop
from ..engine.pump import REFUSED
from ..engine.role import Role
from ..engine.sockets import tune_uplink_socket
from ..engine.stream import Stream
from ..engine.transport import PlainTransport, Transport
from ..wire.actions import OpenLocal
from ..wire.session import DeviceSession
from .policy import TargetPolicy
from ..settings import DeviceSettings

HostPort = Tuple[str, int]

# A server that hangs up this soon after LISTEN, having sent nothing, refused us.
REFUSED_WITHIN = 10.0


class DeviceRole(Role):
    log_name = "device"

    def __init__(self, policy: TargetPolicy, connect_timeout: float) -> None:
        self.policy = policy
        self.connect_timeout = connect_timeout
        self.refused = False    # the server turned this uplink away

    def attach(self, link: Link) -> Dict[type, Callable[[Any], None]]:
        self.link = link
        return {OpenLocal: lambda action: self.open_local(action)}

    def log_closed(self) -> None:
        """One line per end of an uplink: a refusal or a REJECT is a WARNING."""
        link = self.link
        level = logging.WARNING if self.refused or link.session.rejected else logging.INFO
        link.log.log(level, "%s: uplink closed: %s", link.name, link.end_reason or "stopped")

    def on_upgraded(self, detail: str) -> None:
        self.link.log.info("%s: protocol v2: %s", self.link.name, detail)

    def silent_close(self, reset: bool) -> Optional[str]:
        up = time.monotonic() - self.link.started
        if up >= REFUSED_WITHIN:
            return None
        # A legacy server has nothing to say before a client comes; closing
        # at once is how a server turns a device away (a reset, when our
        # LISTEN was still unread: a source outside its allow_from).
        self.refused = True
        return ("refused by the server: it %s the uplink %.1f s after LISTEN, before any "
                "frame (its allow_from may not include this address, another device may hold "
                "its tunnel, this one is not let in, or the port expects TLS: [device] tls)"
                % ("reset" if reset else "closed", up))

    def open_local(self, action: OpenLocal) -> None:
        client_id, address, port = action.client_id, action.address, action.port
        link = self.link
        direct = self.policy.direct(address, port)
        service = self.policy.service(address)
        if direct is None:
            # Needs name lookups (or a refusal): the pump thread does them, never this one.
            peer = "service %s" % service[:40] if service is not None \
                else format_hostport(address, port)
            connect_to: Any = lambda: self._dial_checked(client_id, address, port)
        else:
            peer = format_hostport(*direct)
            link.log.info("%s: client %d: connecting to %s%s", link.name, client_id, peer,
                          " (service %s)" % service if service is not None else "")
            connect_to = direct + (self.connect_timeout,)
        stream = link.new_stream(client_id, peer)
        _give_early(link, stream, action.early)   # either way: held DATA goes first
        link.open_stream(stream, connect_to=connect_to)

    def _dial_checked(self, client_id: int, address: str, port: int) -> socket.socket:
        """Pump thread: dial what the policy allows, with its log line for this client."""
        link = self.link

        def said(what: str) -> None:
            link.log.info("%s: client %d: %s", link.name, client_id, what)
        return self.policy.dial(address, port, self.connect_timeout, said)

    def on_stream_closed(self, stream: Stream, reason: str) -> None:
        if reason.startswith(REFUSED):   # rate-limited: the server picks what it names
            self.link.noisy.warning("%s: refused client %d: %s", self.link.name, stream.id,
                                    reason[len(REFUSED):])
        else:
            super().on_stream_closed(stream, reason)


def _give_early(link: Link, stream: Stream, early: bytearray) -> None:
    # Queued ahead of any later DATA; written once the connect completes (stream_connected).
    if early:
        stream.queue(memoryview(early))
        stream.bytes_from_peer += len(early)
        link.bytes_from_peer += len(early)


def open_device_link(sock: socket.socket, settings: DeviceSettings, name: str, target: HostPort,
                     allowed: Set[HostPort], tls: Any = None,
                     services: Optional[Dict[str, HostPort]] = None) -> Link:
    """A device's Link over a connected uplink socket, with its parts: the socket
    tuned and wrapped in a transport (TLS, handshake done, when `tls` is a
    context: raises TlsError saying which check failed), a loop, a session and
    the device's role."""
    tune_uplink_socket(sock, settings)
    if tls is None:
        transport: Transport = PlainTransport(sock)
    else:
        from ..engine.tls import TlsTransport
        transport = TlsTransport(sock, tls)
        transport.handshake(settings.connect_timeout)
    return device_link(transport, Loop(), device_session(settings), settings, name,
                       TargetPolicy(target, allowed, services))


def device_link(transport: Transport, loop: Loop, session: DeviceSession,
                settings: DeviceSettings, name: str, policy: TargetPolicy) -> Link:
    """A Link in the device's role over a ready transport."""
    return Link(transport, loop, session, settings, name,
                DeviceRole(policy, settings.connect_timeout))


def device_tls(settings: DeviceSettings) -> Any:
    """The TLS context [device] asks for, or None; ConfigError on unusable files.
    Built once (at start: a bad file stops the start); each dial names its
    server (for_server)."""
    if not settings.tls:
        return None
    from ..engine.tls import device_context
    return device_context(settings.tls_server_name, ca=settings.tls_ca or None,
                          fingerprint=settings.tls_fingerprint or None,
                          cert=settings.tls_cert or None, key=settings.tls_key or None)


def for_server(tls: Any, settings: DeviceSettings, host: str) -> Any:
    """`tls` checking the name the server's certificate must carry: tls_server_name,
    or else the host this dial goes to."""
    return tls._replace(server_name=settings.tls_server_name or host)


def device_session(settings: DeviceSettings) -> DeviceSession:
    """The session the settings ask for: v2 when the server offers it (auto), never
    legacy when credentials or TLS are configured."""
    secret = settings.secret.reveal() if settings.secret is not None else None
    return DeviceSession(settings.protocol, settings.id, secret, settings.window,
                         strict=bool(settings.id or secret or settings.tls),
                         offer_wait=settings.connect_timeout,
                         heartbeat=(settings.heartbeat_interval, settings.heartbeat_timeout))
