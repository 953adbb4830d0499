"""Typed, validated settings: one immutable NamedTuple per config section.

ops.config builds them from its SCHEMA after validation (a test checks that
the fields here and the keys there are the same); the rest of tcprc only
reads them. A change (`config set`, SIGHUP) builds a new object and hands it
over whole (`_replace`), so a thread holding the old one sees consistent
values. NamedTuple, not dataclasses: those import inspect, ast and dis (~1 MB).
"""

from typing import List, NamedTuple, Union


class DeviceSettings(NamedTuple):
    """[device]: the tunnel of the device side (DeviceApp)."""
    server: str
    local: str
    allow: List[str]
    autostart: bool
    connect_timeout: float
    reconnect_min: float
    reconnect_max: float
    healthy_after: float
    # the uplink keys both ends have (Link)
    keepalive_idle: int
    keepalive_interval: int
    keepalive_count: int
    send_timeout: float
    stream_buffer: int
    stall_timeout: float


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
    # the uplink keys both ends have (Link)
    keepalive_idle: int
    keepalive_interval: int
    keepalive_count: int
    send_timeout: float
    stream_buffer: int
    stall_timeout: float


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
