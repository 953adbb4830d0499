"""The device's target policy: which CONNECT may reach which address.

A CONNECT reaches only the configured local target (an empty address means
it) or a target listed in `allow`; anything else is refused with CLOSE, so a
server cannot steer the device into its private network.

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

A v2 server names a service of the device ([device.services.NAME]) as
"service:NAME" (port 0): it goes to that service's `local` and nowhere
else; a name the device does not list is refused.
"""

import socket
from typing import Callable, Dict, List, Optional, Set, Tuple

from ..addr import SockAddr, format_hostport, sockaddr_key
from ..engine.pump import TargetRefused
from ..engine.sockets import connect_resolved, connect_tcp, resolve_tcp
from ..wire.frames import SERVICE_PREFIX

HostPort = Tuple[str, int]

LEGACY_DEFAULT_PORT = 23


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


class TargetPolicy:
    """Where a CONNECT may go.  Built in the link thread; read-only afterwards,
    so pump threads call dial() without a lock."""

    def __init__(self, target: HostPort, allowed: Set[HostPort],
                 services: Optional[Dict[str, HostPort]] = None) -> None:
        self.target = target
        self.allowed = allowed
        self.services = services or {}
        self._port_23_configured = any(p == LEGACY_DEFAULT_PORT for _, p in [target] + list(allowed))

    def service(self, address: str) -> Optional[str]:
        """The service name a CONNECT's address asks for ("service:NAME"), or None."""
        return address[len(SERVICE_PREFIX):] if address.startswith(SERVICE_PREFIX) else None

    def direct(self, address: str, port: int) -> Optional[HostPort]:
        """The host and port to dial with no lookup, or None when the pump must check."""
        name = self.service(address)
        if name is not None:
            return self.services.get(name)   # a name not listed: the pump refuses it
        if not address or (port == LEGACY_DEFAULT_PORT and not self._port_23_configured
                           and _is_loopback(address)):
            # The legacy default cannot resolve to a target on another port:
            # straight to `local`, with no lookup (a default server's CONNECT).
            return self.target
        if (address, port) == self.target or (address, port) in self.allowed:
            return address, port
        return None

    def dial(self, address: str, port: int, timeout: float,
             said: Callable[[str], None]) -> socket.socket:
        """Pump thread: resolve the CONNECT's target and dial it only where the policy allows."""
        name = self.service(address)
        if name is not None:   # never a lookup: it is not a host name
            raise TargetRefused("CONNECT to service %r: no such service in [device.services]"
                                % name[:40])
        requested = format_hostport(address, port)
        try:
            wanted = resolve_tcp(address, port)
        except OSError as exc:
            raise TargetRefused("CONNECT to %s: the name does not resolve (%s)"
                                % (requested, exc.strerror or exc)) from None
        chosen = allowed_only(wanted, [self.target] + sorted(self.allowed))
        if chosen:
            said("connecting to %s (%s)" % (requested, format_hostport(*chosen[0][1][:2])))
            return connect_resolved(chosen, timeout)
        if port == LEGACY_DEFAULT_PORT and _is_loopback(address):
            said("%s is the legacy default target: connecting to %s"
                 % (requested, format_hostport(*self.target)))
            return connect_tcp(self.target[0], self.target[1], timeout)
        raise TargetRefused("CONNECT to %s (%s) is not the configured target %s nor in "
                            "[device] allow" % (requested, ", ".join(
                                format_hostport(*item[1][:2]) for item in wanted),
                                format_hostport(*self.target)))

