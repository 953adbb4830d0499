"""The server's ports for device sessions: [server] host, each device's host and its
services' ports; who holds each, and the takeover that hands one over.

A port belongs to an owner: "" for [server] host (legacy sessions and v2
sessions without identity), a device id for that device's host, "ID/NAME"
for a device's service (no id holds a slash).  Two devices configured on
"127.0.0.1:0" get a port each.  One uplink holds a port at a time: a second
session claiming it takes over by default (the old uplink is told to stop
and its teardown hands the port over), or is refused with takeover = false.
A service port is never handed over: it follows its device's host port.

Which ports may coexist at all is one rule, addr.ports_collide, that the
configuration checks (ops.config) and this module's check of the devices
read from devices_dir share.
"""

import logging
import socket
import threading
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..addr import parse_hostport, ports_collide
from ..engine.sockets import bind_listener

log = logging.getLogger("tcprc.server")

HostPort = Tuple[str, int]
HANDOVER = object()   # claim_host: the port comes later, through the link's host_ready


def service_owner(device_id: str, name: str) -> str:
    return "%s/%s" % (device_id, name)


class HostSlot:
    """One port: its listener (the Ports' to open and close), the uplink that
    serves it, and the one waiting to take it over."""

    def __init__(self, owner: str, host: str) -> None:
        self.owner = owner
        self.host = host
        self.active: Any = None      # the ServerLink holding it
        self.successor: Any = None   # the one waiting to take it over
        self.sock: Optional[socket.socket] = None
        self.address: Optional[HostPort] = None

    def bind(self, link: Any) -> socket.socket:
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


class Ports:
    """Every held port by owner.  Thread-safe: links claim and release from their
    own threads, never waiting for another link (a takeover goes through the
    links' loops)."""

    def __init__(self, uplink_log: Any, takeover: Callable[[], bool],
                 standby: Optional[Callable[[str, Optional[socket.socket]], None]] = None) -> None:
        """`uplink_log`: the per-source log of uplink lines; `takeover()`: whether a
        newer session takes a held port over ([server] takeover, read each time).

        `standby(owner, listener)`, in a cluster: the configured devices' ports
        stay open while no session here holds them (keep_open), so that their
        clients can be forwarded to the server that holds the device.  It is
        called with the listener when nobody here serves it (accept its clients
        elsewhere), and with None when a session takes it or it closes."""
        self._lock = threading.Lock()
        self._slots: Dict[str, HostSlot] = {}
        self._log = uplink_log
        self._takeover = takeover
        self._standby = standby
        self._kept: Dict[str, str] = {}   # owner -> host: the ports kept open (a cluster)

    # ---- what status and tests read ------------------------------------------------------
    def address(self, owner: str) -> Optional[HostPort]:
        """Where the port of `owner` accepts clients, while a session holds it."""
        slot = self._slots.get(owner)
        return slot.address if slot is not None else None

    def holder(self, owner: str) -> Any:
        """The uplink holding the port of `owner`, or None."""
        slot = self._slots.get(owner)
        return slot.active if slot is not None else None

    def bound_for(self, owner: str, link: Any) -> Optional[HostPort]:
        """The address of `owner`'s port while `link` is the one holding it."""
        slot = self._slots.get(owner)
        if slot is None or slot.active is not link or link is None:
            return None
        return slot.address

    def sessions(self) -> List[Any]:
        """The uplinks holding a session's port (no service ports: a session each)."""
        with self._lock:
            return [slot.active for slot in self._slots.values()
                    if slot.active is not None and "/" not in slot.owner]

    def held(self) -> Set[str]:
        """The owners whose port is open now."""
        with self._lock:
            return {slot.owner for slot in self._slots.values() if slot.sock is not None}

    # ---- a cluster: every configured device's ports open, held or not ---------------------
    def keep_open(self, wanted: Dict[str, str]) -> None:
        """Keep the ports of `wanted` (owner -> host) open, with or without a session;
        close those no longer wanted while nobody holds them.  A port that cannot be
        bound is one warning (its clients are refused until a reload)."""
        events: List[Tuple[str, Optional[socket.socket]]] = []
        with self._lock:
            for owner in list(self._kept):
                slot = self._slots.get(owner)
                if slot is not None and slot.active is None and wanted.get(owner) != slot.host:
                    events.append((owner, None))   # not wanted any more, or moved
                    slot.unbind()
                    del self._slots[owner]
            self._kept = dict(wanted)
            for owner, host in sorted(wanted.items()):
                if owner in self._slots:
                    continue   # open already (held by a session, or standing by)
                slot = HostSlot(owner, host)
                try:
                    slot.bind(None)
                except OSError as exc:
                    log.warning("cannot keep %s's port %s open for the cluster: %s", owner, host,
                                exc.strerror or exc)
                    continue
                self._slots[owner] = slot
                events.append((owner, slot.sock))
        for owner, sock in events:
            self._standby(owner, sock)

    def _take_standby(self, slot: HostSlot, link: Any) -> socket.socket:
        """Under the lock: a kept port nobody holds goes to `link`."""
        slot.active = link
        return slot.sock

    def _back_to_standby(self, slot: HostSlot) -> bool:
        """Under the lock: a kept port its session gave back stays open; True if so."""
        if self._standby is None or self._kept.get(slot.owner) != slot.host:
            return False
        slot.active = None
        return True

    # ---- what links ask ------------------------------------------------------------------------
    def claim_host(self, link: Any, owner: str, host: str) -> Any:
        """Link thread, once its session is established: the listener of `owner`'s
        port on `host` for `link`; None when refused (takeover = false); HANDOVER
        when a live uplink holds it: that one is told to stop, and its teardown
        hands the port to `link` (release). Raises OSError when it cannot be bound."""
        with self._lock:
            slot = self._slots.get(owner)
            if slot is None:
                slot = HostSlot(owner, host)
                sock = slot.bind(link)   # OSError: the caller says why
                self._slots[owner] = slot
                return sock
            current = slot.active
            taken = current is None and slot.sock is not None   # kept open, nobody holds it
            if taken:
                sock = self._take_standby(slot, link)
            else:
                refused = not self._takeover()
                waiting = None
                if not refused:
                    waiting, slot.successor = slot.successor, link
        if taken:
            self._standby(owner, None)
            return sock
        if refused:
            self._log.warning(link.source, "%s: LISTEN refused: the tunnel belongs to %s "
                              "(takeover = false; host port %s)", link.name, current.name, host)
            return None
        self._log.warning(link.source, "%s: LISTEN takes over the tunnel from %s (host port %s)",
                          link.name, current.name, host)
        current.stop("replaced by %s" % link.name)
        if waiting is not None:   # an earlier newcomer still waiting: this one wins
            waiting.stop("replaced by %s" % link.name)
        return HANDOVER

    def claim_service(self, link: Any, device_id: str, name: str,
                      host: str) -> Optional[socket.socket]:
        """Link thread, once it holds its device's host port: the listener of the
        device's service `name` (OSError: it cannot be bound).  A takeover has
        released the previous session's with its host port, so a slot still held
        is refused (None, logged)."""
        owner = service_owner(device_id, name)
        with self._lock:
            slot = self._slots.get(owner)
            if slot is None:
                slot = HostSlot(owner, host)
                sock = slot.bind(link)
                self._slots[owner] = slot
                return sock
            holder = slot.active
            taken = holder is None and slot.sock is not None
            if taken:
                sock = self._take_standby(slot, link)
        if taken:
            self._standby(owner, None)
            return sock
        if holder is not link:
            self._log.warning(link.source, "%s: service %s: its port %s is held by %s",
                              link.name, name, host, holder.name if holder else "nobody")
        return None

    def service_host(self, link: Any, device_id: str, name: str) -> Optional[str]:
        """The host `link` bound its service `name` to."""
        slot = self._slots.get(service_owner(device_id, name))
        return slot.host if slot is not None and slot.active is link else None

    def release_service(self, link: Any, device_id: str, name: str) -> None:
        """Link thread: one service port of `link` closed (no longer configured)."""
        owner = service_owner(device_id, name)
        standby = None
        with self._lock:
            slot = self._slots.get(owner)
            if slot is not None and slot.active is link:
                if self._back_to_standby(slot):
                    standby = slot.sock
                else:
                    slot.unbind()
                    del self._slots[owner]
        if standby is not None:
            self._standby(owner, standby)

    def release(self, link: Any) -> None:
        """Link thread, at teardown (no longer watching its listeners): its host and
        service listeners are closed, and the host port goes to the uplink waiting
        for it, if any, through that uplink's own loop."""
        standby: List[Tuple[str, socket.socket]] = []
        try:
            with self._lock:
                slot = None
                for other in list(self._slots.values()):
                    if other.successor is link:
                        other.successor = None   # it ended while waiting
                        return
                    if other.active is not link:
                        continue
                    if "/" in other.owner:   # a service port: never handed over
                        if self._back_to_standby(other):
                            standby.append((other.owner, other.sock))
                        else:
                            other.unbind()
                            del self._slots[other.owner]
                    else:
                        slot = other
                if slot is None:
                    return
                successor, slot.successor = slot.successor, None
                if successor is not None and slot.sock is not None and \
                        self._kept.get(slot.owner) == slot.host:
                    sock, error = self._take_standby(slot, successor), None   # kept: no rebind
                elif successor is not None:
                    slot.unbind()
                    sock, error = None, None
                    try:
                        sock = slot.bind(successor)
                    except OSError as exc:
                        error = exc
                        del self._slots[slot.owner]
                elif self._back_to_standby(slot):
                    standby.append((slot.owner, slot.sock))
                    return
                else:
                    slot.unbind()
                    del self._slots[slot.owner]
                    return
        finally:
            for owner, sock in standby:
                self._standby(owner, sock)
        successor.loop.call_soon(lambda: successor.host_ready(sock, error))

    def close_all(self) -> None:
        """The server stops: every listener still open goes (links release theirs)."""
        with self._lock:
            self._kept = {}
            for slot in self._slots.values():
                slot.unbind()
            self._slots.clear()


def drop_colliding(devices: Dict[str, Any], settings: Any) -> None:
    """Skip (one line each) a device from a file with a port (its host or a service's)
    that is another's, or [server] listen's, host's or http's (the configuration file's
    were checked at load, by the same rule)."""
    taken = [("[server] listen", settings.listen), ("[server] host", settings.host)]
    if settings.http:
        taken.append(("[server] http", settings.http))
    taken += [(owner, host) for entry in settings.devices.values()
              for _, owner, host in ports_of(entry)]
    for ident in sorted(devices):
        if ident in settings.devices:
            continue
        clash, mine = "", []
        for what, owner, host in ports_of(devices[ident]):
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


def ports_of(entry: Any) -> List[Tuple[str, str, str]]:
    """(what, owner, host) of each port of a DeviceEntry: its host, then its services'."""
    return [("its host", "device %s" % entry.id, entry.host)] + [
        ("its service %s's host" % name, "service %s of device %s" % (name, entry.id), host)
        for name, host in sorted(entry.services.items())]
