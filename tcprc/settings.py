"""Typed, validated settings: one immutable NamedTuple per config section.

DeviceSettings and ServerSettings are made from the key tables of tcprc.keys
(a field per key, the link keys flat among them); the others are written
here, and a test checks them against ops.config's SCHEMA. ops.config builds
them after validation; the rest of tcprc only reads them. A change (`config
set`, SIGHUP) builds a new object and hands it over whole (`_replace`), so a
thread holding the old one sees consistent values. NamedTuple, not
dataclasses: those import inspect, ast and dis (~1 MB).
"""

from _operator import _compare_digest
from types import MappingProxyType
from typing import Any, Dict, List, Mapping, NamedTuple, Optional, Tuple

from .keys import DEVICE_KEYS, LINK_KEYS, SERVER_KEYS, Key


class Secret:
    """A shared secret that never shows itself: repr, str and format give
    "<secret>", pickling refuses. Equal by value (constant time), so a
    settings change is seen; reveal() hands the bytes to the HMAC."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = bytes(value)

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return "<secret>"

    def __eq__(self, other: Any) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        # hmac.compare_digest without hmac, which would load OpenSSL's libcrypto
        # (3.7 MB of RSS): the interpreter's own constant-time compare.
        return _compare_digest(self._value, other._value)

    def __ne__(self, other: Any) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __hash__(self) -> int:
        return hash((Secret, self._value))

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("a Secret is not pickled (it would be written out in clear)")

    def __copy__(self) -> "Secret":
        return self   # immutable

    def __deepcopy__(self, memo: Any) -> "Secret":
        return self


class DeviceEntry(NamedTuple):
    """One [server.devices.ID] table: a device with its own identity (v2)."""
    id: str
    secret: Secret
    host: str
    previous: Optional[Secret] = None    # previous_secret: still accepted while rotating
    services: Mapping[str, str] = MappingProxyType({})   # name -> host ("ADDR:PORT")


class LinkSettings:
    """What a Link reads: the uplink keys both ends have (keys.LINK_KEYS), as
    attributes. DeviceSettings and ServerSettings are LinkSettings: they have
    these fields, flat, beside their own."""
    __slots__ = ()
    KEYS = tuple(LINK_KEYS)


# Fields that hold what ops.config builds from a key, not the key's own value.
_RESOLVED: Dict[str, Any] = {
    "server": Tuple[str, ...],           # [device] server: "ADDR:PORT" each, tried in order
    "secret": Optional[Secret],          # from `secret` or read from `secret_file`; None: none
    "services": Mapping[str, str],       # read-only: [device.services.NAME] name -> local
    "devices": Mapping[str, DeviceEntry],   # read-only: [server.devices.ID] id -> entry
    "http_token": Optional[Secret],      # from http_token or http_token_file; None: no login
}


def _settings_type(name: str, keys: Dict[str, Key], doc: str) -> Any:
    """A NamedTuple of one field per key of `keys` (in their order), a LinkSettings."""
    fields = NamedTuple("_" + name, [(key, _RESOLVED.get(key, spec.type))
                                     for key, spec in keys.items()])
    return type(name, (fields, LinkSettings), {"__slots__": (), "__doc__": doc,
                                               "__module__": __name__})


DeviceSettings = _settings_type("DeviceSettings", DEVICE_KEYS,
                                "[device]: the tunnel of the device side (DeviceApp).")
ServerSettings = _settings_type("ServerSettings", SERVER_KEYS,
                                "[server]: the uplink acceptor and host port of the server "
                                "side (ServerApp).")


class ClusterSettings(NamedTuple):
    """[cluster] (server only; no table: no cluster): servers sharing one etcd
    forward a client to the server that holds its device's uplink."""
    name: str                    # key prefix /tcprc/<name>/ in etcd
    node: str                    # this server's name in the cluster
    etcd: List[str]              # "http://ADDR:PORT" of the etcd members
    peer_listen: str             # where the other servers forward clients to this one
    peer_advertise: str          # what the others dial (resolved: peer_listen when not set)
    secret: Secret               # shared by the servers, from `secret` or `secret_file`
    secret_file: str
    lease_ttl: int
    client_wait: float


class ConsoleSettings(NamedTuple):
    """[console] (device only): the serial console."""
    port: str
    baudrate: int
    echo: bool
    prompt: str


class ControlSettings(NamedTuple):
    """[control]: the control socket for `tcprc ctl`."""
    socket: str


class LogSettings(NamedTuple):
    """[log]: level and target of the "tcprc" logger."""
    level: str
    target: str
