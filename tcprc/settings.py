"""Typed, validated settings: one immutable NamedTuple per config section.

ops.config builds them from its SCHEMA after validation (a test checks that
the fields here and the keys there are the same); the rest of tcprc only
reads them. A change (`config set`, SIGHUP) builds a new object and hands it
over whole (`_replace`), so a thread holding the old one sees consistent
values. NamedTuple, not dataclasses: those import inspect, ast and dis (~1 MB).
"""

from _operator import _compare_digest
from types import MappingProxyType
from typing import Any, List, Mapping, NamedTuple, Optional, Tuple, Union


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


class DeviceSettings(NamedTuple):
    """[device]: the tunnel of the device side (DeviceApp)."""
    server: Tuple[str, ...]      # "ADDR:PORT" each, tried in order; (): no server, stay idle
    local: str
    allow: List[str]
    autostart: bool
    connect_timeout: float
    reconnect_min: float
    reconnect_max: float
    healthy_after: float
    # protocol v2: identity and TLS (validated and resolved by ops.config)
    protocol: str
    id: str
    secret: Optional[Secret]     # from `secret` or read from `secret_file`; None: no identity
    secret_file: str
    allow_readable_secrets: bool   # group/world-readable secret files and configs accepted
    tls: bool
    tls_ca: str
    tls_fingerprint: str         # "sha256:" + 64 lower-case hex digits, or ""
    tls_server_name: str
    tls_cert: str
    tls_key: str
    services: Mapping[str, str]  # read-only: [device.services.NAME] name -> local ("ADDR:PORT")
    # the uplink keys both ends have (Link)
    keepalive_idle: int
    keepalive_interval: int
    keepalive_count: int
    send_timeout: float
    stream_buffer: int
    stall_timeout: float
    window: int
    heartbeat_interval: float
    heartbeat_timeout: float


class ServerSettings(NamedTuple):
    """[server]: the uplink acceptor and host port of the server side (ServerApp)."""
    listen: str
    host: str
    listen_timeout: float
    max_pending: int
    max_pending_per_source: int
    allow_from: List[str]
    takeover: bool
    connect_address: str
    connect_port: int
    id_quarantine: float
    # protocol v2: who may dial in, and TLS
    legacy: bool                 # identity-less (legacy) devices allowed
    tls_cert: str
    tls_key: str
    tls_client_ca: str
    devices: Mapping[str, DeviceEntry]   # read-only: id -> entry
    # the fleet: more devices from files, limits, the status page
    devices_dir: str
    allow_readable_secrets: bool   # group/world-readable secret and device files accepted
    max_streams_per_device: int
    http: str
    http_hosts: List[str]        # more names the status page answers to ("NAME" or "NAME:PORT")
    http_token: Optional[Secret]  # from http_token or http_token_file; None: no login
    http_token_file: str
    http_metrics_open: bool      # /metrics without the token
    # the uplink keys both ends have (Link)
    keepalive_idle: int
    keepalive_interval: int
    keepalive_count: int
    send_timeout: float
    stream_buffer: int
    stall_timeout: float
    window: int
    heartbeat_interval: float
    heartbeat_timeout: float


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


# What a Link reads: the uplink keys both ends have.
LinkSettings = Union[DeviceSettings, ServerSettings]
