"""TOML configuration: one file per role, validated at start into typed settings.

Every key has a type, a default and a check; an empty file is a valid config.
Every error is one ConfigError line naming the file, the key and the problem.
Each section becomes a NamedTuple of tcprc.settings (not dataclasses: importing
them pulls in inspect, ast and dis, about 1 MB of RSS on a gateway that has 64).
Also here, next to the schema they follow: command words to values
(`config set`) and `config save`.
"""

import os
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

from ..addr import parse_hostport, parse_network
from ..errors import ConfigError
from ..settings import (ConsoleSettings, ControlSettings, DeviceSettings, LogSettings,
                        ServerSettings)
from . import tomlwrite
from .tomlwrite import tomllib   # tomllib, or tomli before Python 3.11: chosen once, there


def _hostport(allow_empty: bool, bind: bool = False) -> Callable[[Any], Optional[str]]:
    """ADDR:PORT.  Addresses we listen on (`bind`) may omit the host (all
    interfaces) and use port 0 (any free port); addresses we dial may not."""
    def check(value: Any) -> Optional[str]:
        if value == "" and allow_empty:
            return None
        try:
            parse_hostport(value, allow_empty_host=bind, allow_zero_port=bind)
        except ValueError as exc:
            return str(exc)
        return None
    return check


def _hostport_list(value: Any) -> Optional[str]:
    for item in value:
        if not isinstance(item, str):
            return "every entry must be a string \"ADDR:PORT\", got %r" % (item,)
        problem = _hostport(False)(item)
        if problem:
            return problem
    return None


def _network_list(value: Any) -> Optional[str]:
    if not value:
        return "must name at least one network (CIDR), got an empty list"
    for item in value:
        if not isinstance(item, str):
            return "every entry must be a string \"ADDR/PREFIX\", got %r" % (item,)
        try:
            parse_network(item)
        except ValueError as exc:
            return str(exc)
    return None


def _between(low: float, high: float) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if not low <= value <= high:
            return "must be between %s and %s, got %s" % (low, high, value)
        return None
    return check


def _one_of(*choices: str) -> Callable[[Any], Optional[str]]:
    def check(value: Any) -> Optional[str]:
        if value not in choices:
            return "must be one of %s, got %r" % (", ".join(choices), value)
        return None
    return check


def _wire_address(value: Any) -> Optional[str]:
    """CONNECT carries the address as ASCII; anything else would be refused by the device."""
    if not all(33 <= ord(c) < 127 for c in value) or len(value) > 255:
        return "must be ASCII without spaces, at most 255 characters, got %r" % value
    return None


def _log_target(value: Any) -> Optional[str]:
    if value in ("auto", "stderr", "syslog") or value.startswith("/"):
        return None
    return "must be auto, stderr, syslog or an absolute file path, got %r" % value


class Key(NamedTuple):
    type: type
    default: Any
    check: Optional[Callable[[Any], Optional[str]]] = None
    doc: str = ""


# Keys every tunnel end has: liveness and per-stream buffering of the uplink.
_LINK_KEYS = {
    "keepalive_idle": Key(int, 60, _between(1, 7200), "seconds of uplink silence before TCP keepalive probes"),
    "keepalive_interval": Key(int, 10, _between(1, 600), "seconds between keepalive probes"),
    "keepalive_count": Key(int, 5, _between(1, 50), "unanswered probes before the uplink is declared dead"),
    "send_timeout": Key(float, 60.0, _between(1, 3600), "seconds a frame may wait on a congested uplink before it is declared dead"),
    "stream_buffer": Key(int, 262144, _between(4096, 16 * 1024 * 1024), "bytes queued for one slow local socket before the uplink stops reading"),
    "stall_timeout": Key(float, 30.0, _between(0.1, 3600), "seconds a stream over its buffer may make no progress before it is closed"),
}

SCHEMA: Dict[str, Dict[str, Dict[str, Key]]] = {
    "device": {
        "device": dict({
            "server": Key(str, "", _hostport(True), "ServerAddress:ServerPort; empty: wait for TCPRemoteConnect"),
            "local": Key(str, "127.0.0.1:23", _hostport(False), "LocalAddress:LocalPort, the service clients reach"),
            "allow": Key(list, [], _hostport_list, "further targets a CONNECT may name (default: only `local`)"),
            "autostart": Key(bool, True, None, "dial the server at start when `server` is set"),
            "connect_timeout": Key(float, 10.0, _between(0.1, 300), "seconds to connect to the server or to a target"),
            "reconnect_min": Key(float, 1.0, _between(0.01, 3600), "first reconnect delay, doubled per failure"),
            "reconnect_max": Key(float, 60.0, _between(0.01, 86400), "cap of the reconnect delay"),
            "healthy_after": Key(float, 30.0, _between(0.1, 86400), "seconds up after which the reconnect delay resets"),
        }, **_LINK_KEYS),
        "console": {
            "port": Key(str, "", None, "serial device or pyserial URL; empty: no console"),
            "baudrate": Key(int, 115200, _between(50, 4000000), "serial speed"),
            "echo": Key(bool, True, None, "echo typed characters"),
            "prompt": Key(str, "tcprc> ", None, "prompt printed before each command"),
        },
        "control": {
            "socket": Key(str, "/run/tcprc/tcprc.sock", None, "Unix socket for `tcprc ctl`; empty: none"),
        },
        "log": {
            "level": Key(str, "info", _one_of("debug", "info", "warning", "error"), "log level"),
            "target": Key(str, "auto", _log_target, "auto (stderr, syslog when daemonized), stderr, syslog or /path"),
        },
    },
    "server": {
        "server": dict({
            "listen": Key(str, "0.0.0.0:9000", _hostport(False, bind=True), "ServerAddress:ServerPort where devices dial in"),
            "host": Key(str, "127.0.0.1:2222", _hostport(False, bind=True), "HostAddress:HostPort where clients connect"),
            "listen_timeout": Key(float, 10.0, _between(0.1, 3600), "seconds a new uplink may take to send LISTEN"),
            "max_pending": Key(int, 64, _between(1, 4096), "uplinks allowed to wait for their LISTEN at once; when full, the one waiting longest is dropped"),
            "max_pending_per_source": Key(int, 4, _between(1, 4096), "of those, from one source address (an IPv6 /64); over it, that source's oldest is dropped"),
            "allow_from": Key(list, ["0.0.0.0/0", "::/0"], _network_list, "networks (CIDR) devices may dial in from; the legacy protocol has no authentication"),
            "takeover": Key(bool, True, None, "a newer LISTEN replaces the live uplink (false: refuse the newcomer)"),
            "connect_address": Key(str, "127.0.0.1", _wire_address, "address sent in CONNECT: a legacy device dials exactly it (with connect_port: 127.0.0.1:23 by default); a tcprc device takes \"\" or this default as its own `local`"),
            "connect_port": Key(int, 23, _between(0, 65535), "port sent in CONNECT"),
            "id_quarantine": Key(float, 10.0, _between(0.1, 600), "seconds at most a client id the server closed waits for the device's answering CLOSE before reuse, once the device is seen to answer (legacy Lua agents do); otherwise a few uplink round trips"),
        }, **_LINK_KEYS),
        "control": {
            "socket": Key(str, "/run/tcprc/tcprc-server.sock", None, "Unix socket for `tcprc ctl`; empty: none"),
        },
        "log": {
            "level": Key(str, "info", _one_of("debug", "info", "warning", "error"), "log level"),
            "target": Key(str, "auto", _log_target, "auto (stderr, syslog when daemonized), stderr, syslog or /path"),
        },
    },
}


# The settings type of each section; a test checks its fields against SCHEMA.
SECTION_TYPES: Dict[str, type] = {
    "device": DeviceSettings, "server": ServerSettings, "console": ConsoleSettings,
    "control": ControlSettings, "log": LogSettings,
}


class Config:
    """One role's validated config: cfg.device (a DeviceSettings), cfg.log, ...

    The sections are immutable; `config set` replaces one in `sections`
    (under the CommandParser's lock) and SIGHUP replaces the whole Config.
    """

    def __init__(self, role: str, path: Optional[str], raw: Dict[str, Any],
                 sections: Dict[str, Any]):
        self.role = role
        self.path = path
        self.raw = raw                  # the file's own tables, for `config save`
        self.sections = sections

    def __repr__(self) -> str:
        return "Config(role=%r, path=%r)" % (self.role, self.path)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None


def _type_name(tp: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list"}[tp]


def check_value(role: str, section: str, key: str, value: Any) -> Any:
    """Validate one value; return it normalised (int -> float) or raise ValueError."""
    spec = SCHEMA[role].get(section, {}).get(key)
    if spec is None:
        raise ValueError("unknown key")
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.type) or (spec.type is not bool and isinstance(value, bool)):
        raise ValueError("must be %s, got %r" % (_type_name(spec.type), value))
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ValueError(problem)
    return value


def build_config(role: str, raw: Dict[str, Any], source: str, path: Optional[str] = None) -> Config:
    """Validate a parsed TOML document; `source` names it in errors."""
    schema = SCHEMA[role]
    sections: Dict[str, Any] = {}
    for name in raw:
        if name not in schema:
            raise ConfigError("%s: unknown section [%s] (known: %s)"
                              % (source, name, ", ".join(sorted(schema))))
        if not isinstance(raw[name], dict):
            raise ConfigError("%s: %s must be a table [%s]" % (source, name, name))
    for name, keys in schema.items():
        table = raw.get(name, {})
        values = {key: spec.default for key, spec in keys.items()}
        for key, value in table.items():
            if key not in keys:
                raise ConfigError("%s: [%s] unknown key %r (known: %s)"
                                  % (source, name, key, ", ".join(sorted(keys))))
            try:
                values[key] = check_value(role, name, key, value)
            except ValueError as exc:
                raise ConfigError("%s: [%s] %s %s" % (source, name, key, exc)) from None
        sections[name] = SECTION_TYPES[name](**values)
    return Config(role=role, path=path, raw=raw, sections=sections)


def load_config(path: Optional[str], role: str) -> Config:
    """Read and validate `path` (None: all defaults)."""
    if path is None:
        return build_config(role, {}, "defaults")
    try:
        with open(path, "rb") as handle:
            raw = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError("%s: no such file" % path) from None
    except IsADirectoryError:
        raise ConfigError("%s: is a directory, not a config file" % path) from None
    except PermissionError:
        raise ConfigError("%s: permission denied" % path) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("%s: invalid TOML: %s" % (path, exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text: %s" % (path, exc)) from None
    return build_config(role, raw, path, os.path.abspath(path))


def with_overrides(cfg: Config, overrides: List[Tuple[str, str, Any, str]]) -> Config:
    """Apply command-line overrides (section, key, value, flag name) and revalidate."""
    raw = {name: dict(table) for name, table in cfg.raw.items()}
    for section, key, value, flag in overrides:
        try:
            check_value(cfg.role, section, key, value)
        except ValueError as exc:
            raise ConfigError("%s: %s" % (flag, exc)) from None
        raw.setdefault(section, {})[key] = value
    merged = build_config(cfg.role, raw, cfg.path or "command line", cfg.path)
    merged.raw = cfg.raw   # `config save` writes the file's keys, not the flags
    return merged


MAX_DETAIL = 1024   # characters of one value or detail in a message; a console stays readable


def one_line(text: Any) -> str:
    """`text` as one line of at most MAX_DETAIL characters (plus "...")."""
    line = " ".join(str(text).split())
    if len(line) > MAX_DETAIL:
        line = line[:MAX_DETAIL] + "..."
    return line


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def value_from_words(name: str, kind: type, words: List[str]) -> Any:
    """The value of schema type `kind` that command words spell (`config set`).

    Lists take several words or comma-separated ones; other types exactly one.
    Raises ValueError with one line naming `name`. check_value validates after.
    """
    if kind is list:
        items = []
        for word in words:
            items.extend(part.strip() for part in word.split(",") if part.strip())
        return items
    if len(words) != 1:
        raise ValueError("%s takes one value, got %d (quote a value with spaces)"
                         % (name, len(words)))
    word = words[0]
    try:
        if kind is bool:
            if word.lower() in _TRUE:
                return True
            if word.lower() in _FALSE:
                return False
            raise ValueError
        if kind is int:
            return int(word, 10)
        if kind is float:
            return float(word)
    except ValueError:
        kinds = {bool: "true or false", int: "an integer", float: "a number"}
        raise ValueError("%s must be %s, got %r" % (name, kinds[kind], one_line(word))) from None
    return word


def save_config(cfg: Config, changes: Dict[Tuple[str, str], Any]) -> str:
    """`config save`: write `changes` {(section, key): value} to cfg's file.

    Builds on the file as it is now (edits made since the start survive),
    keeps its comments and layout where it can, refuses to write what the
    next start would refuse, and replaces the file atomically. Returns the
    path; every failure is one ConfigError line and leaves the file as it was.
    """
    path = cfg.path
    if not path:
        raise ConfigError("no configuration file to save to: the agent was started "
                          "without -c FILE")
    try:
        with open(path, "rb") as handle:
            old_bytes: Optional[bytes] = handle.read()
    except FileNotFoundError:
        old_bytes = None
    except OSError as exc:
        raise ConfigError("cannot read %s: %s" % (path, exc.strerror or exc)) from None
    old_text = None
    if old_bytes is None:
        base: Dict[str, Any] = {name: dict(table) for name, table in cfg.raw.items()}
    else:
        try:
            old_text = old_bytes.decode("utf-8")
            base = tomllib.loads(old_text)
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError("%s is not valid TOML any more (%s); not overwritten"
                              % (path, one_line(exc))) from None
    for (section, key), value in changes.items():
        base.setdefault(section, {})[key] = value
    try:
        build_config(cfg.role, base, path)   # never save what the next start refuses
        text = tomlwrite.render(old_text, base, changes)
        tomlwrite.atomic_write(path, text)
    except ConfigError as exc:
        raise ConfigError("not saved: %s" % exc) from None
    except OSError as exc:
        raise ConfigError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    return path
