"""TOML configuration: one file per role, validated at start into typed settings.

Every key has a type, a default, a check and when a change of it applies;
an empty file is a valid config.
Every error is one ConfigError line naming the file, the key and the problem.
Each section becomes a NamedTuple of tcprc.settings (not dataclasses: importing
them pulls in inspect, ast and dis, about 1 MB of RSS on a gateway that has 64).
Also here, next to the schema they follow: command words to values
(`config set`) and `config save`.
"""

import errno
import os
from types import MappingProxyType
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..addr import WILDCARD_ADDRESSES, parse_hostport, ports_collide
from ..errors import ConfigError
from ..keys import (DEVICE_KEYS, ID_CHARS as _ID_CHARS, LIVE, RESTART, SERVER_KEYS, SESSION, Key,
                    between as _between, hostport as _hostport, identity as _device_id,
                    normal_fingerprint as _normal_fingerprint, one_of as _one_of)
from ..settings import (ClusterSettings, ConsoleSettings, ControlSettings, DeviceEntry,
                        DeviceSettings, LogSettings, Secret, ServerSettings)
from .files import (FileContent, FileProblem, check_regular_file, printable, read_regular_file,
                    readable_by_others, unprotected)
from .tomlread import tomllib   # tomllib, or tomli before Python 3.11: chosen there


def server_list(value: Any) -> Tuple[str, ...]:
    """The servers a [device] server value names, in order: "" -> (), "a:1" -> ("a:1",)."""
    if isinstance(value, str):
        return (value,) if value else ()
    return tuple(value)


def server_value(servers: Tuple[str, ...]) -> Any:
    """The value a file holds for `servers`: a string for none or one, else a list."""
    return list(servers) if len(servers) > 1 else "".join(servers)


def _log_target(value: Any) -> Optional[str]:
    if value in ("auto", "stderr", "syslog") or value.startswith("/"):
        return None
    return "must be auto, stderr, syslog or an absolute file path, got %r" % value


def secret_problem(text: str) -> Optional[str]:
    """Why `text` is too weak for a secret (at least 128 bits, v2.md), never quoting it."""
    if all(c in "0123456789abcdefABCDEF" for c in text):
        if len(text) >= 32:
            return None
    elif len(text) >= 22:
        return None
    return ("is shorter than 128 bits: use at least 32 hex digits or 22 other characters "
            "(e.g. openssl rand -hex 16)")


def _etcd_urls(value: Any) -> Optional[str]:
    """etcd client URLs: "http://ADDR:PORT" each (the v3 JSON gateway over plain HTTP)."""
    for item in value:
        if not isinstance(item, str):
            return "every entry must be a string \"http://ADDR:PORT\", got %r" % (item,)
        scheme, sep, rest = item.partition("://")
        if not sep or scheme.lower() != "http":
            if scheme.lower() == "https":
                return "%r: https is not supported yet: use http:// URLs" % item[:120]
            return "every entry must be \"http://ADDR:PORT\", got %r" % item[:120]
        problem = _hostport(False)(rest[:-1] if rest.endswith("/") else rest)
        if problem:
            return "%r: %s" % (item[:120], problem)
    return None


# [log], the same in both roles.
LOG_KEYS: Dict[str, Key] = {
    "level": Key(str, "info", _one_of("debug", "info", "warning", "error"), "log level", LIVE),
    "target": Key(str, "auto", _log_target, "auto (stderr, syslog when daemonized), stderr, syslog or /path", LIVE),
}

# Every key of each role's tables (tcprc.keys has those of [device] and [server]),
# with when a change applies (keys.APPLIES): the serial console and the control
# socket are opened at start, [log] is set up again at once, and [cluster] is read
# at start.
SCHEMA: Dict[str, Dict[str, Dict[str, Key]]] = {
    "device": {
        "device": DEVICE_KEYS,
        "console": {
            "port": Key(str, "", None, "serial device or pyserial URL; empty: no console", RESTART),
            "baudrate": Key(int, 115200, _between(50, 4000000), "serial speed", RESTART),
            "echo": Key(bool, True, None, "echo typed characters", RESTART),
            "prompt": Key(str, "tcprc> ", None, "prompt printed before each command", RESTART),
        },
        "control": {
            "socket": Key(str, "/run/tcprc/tcprc.sock", None, "Unix socket for `tcprc ctl`; empty: none", RESTART),
        },
        "log": LOG_KEYS,
    },
    "server": {
        "server": SERVER_KEYS,
        "cluster": {
            "name": Key(str, "tcprc", _device_id(False), "the cluster's name: its keys in etcd are under /tcprc/<name>/", RESTART),
            "node": Key(str, "", _device_id(True), "this server's name, unique in the cluster (required)", RESTART),
            "etcd": Key(list, [], _etcd_urls, "client URLs \"http://ADDR:PORT\" of the etcd members (required)", RESTART),
            "peer_listen": Key(str, "", _hostport(True, bind=True), "ADDR:PORT where the other servers forward clients to this one (required)", RESTART),
            "peer_advertise": Key(str, "", _hostport(True), "ADDR:PORT the other servers dial; empty: peer_listen", RESTART),
            "secret": Key(str, "", None, "the secret the servers share (at least 128 bits); prefer secret_file", RESTART),
            "secret_file": Key(str, "", None, "file holding the cluster secret (surrounding white space ignored)", RESTART),
            "lease_ttl": Key(int, 10, _between(2, 600), "seconds a server's registrations outlive it (its etcd lease)", RESTART),
            "client_wait": Key(float, 5.0, _between(0, 300), "seconds a client is held while its device moves between servers", RESTART),
        },
        "control": {
            "socket": Key(str, "/run/tcprc/tcprc-server.sock", None, "Unix socket for `tcprc ctl`; empty: none", RESTART),
        },
        "log": LOG_KEYS,
    },
}


# The settings type of each section; a test checks its fields against SCHEMA.
SECTION_TYPES: Dict[str, type] = {
    "device": DeviceSettings, "server": ServerSettings, "console": ConsoleSettings,
    "control": ControlSettings, "log": LogSettings, "cluster": ClusterSettings,
}

# Sections whose absence means "off": no table, no settings (the Config holds None).
OPTIONAL_SECTIONS = frozenset(("cluster",))


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
        # The sections the agent started with: a key that needs a restart keeps its
        # value from them until then (a reload hands them on to the new Config).
        self.started = dict(sections)

    def __repr__(self) -> str:
        return "Config(role=%r, path=%r)" % (self.role, self.path)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["sections"][name]
        except KeyError:
            raise AttributeError(name) from None


def _type_name(tp: Any) -> str:
    if isinstance(tp, tuple):   # a key of several types: [device] server, a string or a list
        return " or ".join(_type_name(one) for one in tp)
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            list: "a list", dict: "a table"}[tp]


SECRET_KEYS = frozenset(("secret", "previous_secret", "http_token"))   # values no message, log line or `config get` shows


def check_value(role: str, section: str, key: str, value: Any) -> Any:
    """Validate one value; return it normalised (int -> float) or raise ValueError."""
    spec = SCHEMA[role].get(section, {}).get(key)
    if spec is None:
        raise ValueError("unknown key")
    if spec.type is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, spec.type) or (spec.type is not bool and isinstance(value, bool)):
        if key in SECRET_KEYS:   # never quote what may be a secret
            raise ValueError("must be %s" % _type_name(spec.type))
        raise ValueError("must be %s, got %r" % (_type_name(spec.type), value))
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise ValueError(problem)
    return value


def close_match(word: Any, known: Any) -> Optional[str]:
    """The one of `known` that `word` is a near miss of (a typo), or None."""
    import difflib   # only on the error path: a start does not pay for it
    if not isinstance(word, str):
        return None
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return close[0] if close else None


def suggest(word: Any, known: Any) -> str:
    """"did you mean listen?" for a near miss of one of `known`, else the list."""
    close = close_match(word, known)
    return "did you mean %s?" % close if close else "known: %s" % ", ".join(known)


def build_config(role: str, raw: Dict[str, Any], source: str, path: Optional[str] = None) -> Config:
    """Validate a parsed TOML document; `source` names it in errors."""
    schema = SCHEMA[role]
    sections: Dict[str, Any] = {}
    for name in raw:
        if name not in schema:
            raise ConfigError("%s: unknown section [%s] (%s)"
                              % (source, name, suggest(name, sorted(schema))))
        if not isinstance(raw[name], dict):
            raise ConfigError("%s: %s must be a table [%s]" % (source, name, name))
    for name, keys in schema.items():
        if name in OPTIONAL_SECTIONS and name not in raw:
            sections[name] = None
            continue
        table = raw.get(name, {})
        values = {key: spec.default for key, spec in keys.items()}
        for key, value in table.items():
            if key not in keys:
                raise ConfigError("%s: unknown key %r in [%s] (%s)"
                                  % (source, key, name, suggest(key, sorted(keys))))
            try:
                values[key] = check_value(role, name, key, value)
            except ValueError as exc:
                raise ConfigError("%s: [%s] %s %s" % (source, name, key, exc)) from None
        if path:
            values = _files_beside(values, os.path.dirname(path))
        try:
            sections[name] = finish_section(name, values, _allow_readable(sections, role))
        except SectionProblem as exc:
            raise ConfigError("%s: [%s] %s" % (source, exc.table, exc)) from None
    return Config(role=role, path=path, raw=raw, sections=sections)


# -- checks across keys, and what is resolved at build time (secrets, devices) --------

_FILE_KEYS = ("secret_file", "tls_ca", "tls_cert", "tls_key", "tls_client_ca", "devices_dir",
              "http_token_file")


def _files_beside(values: Dict[str, Any], directory: str) -> Dict[str, Any]:
    """Relative file names are the config file's neighbours, not the working
    directory's (a daemon runs in /, and a reload must find the same files)."""
    def beside(name: Any) -> Any:
        if isinstance(name, str) and name and not os.path.isabs(name):
            return os.path.join(directory, name)
        return name
    values = dict(values)
    for key in _FILE_KEYS:
        if key in values:
            values[key] = beside(values[key])
    devices = values.get("devices")
    if isinstance(devices, dict):
        values["devices"] = {ident: device_files_beside(table, directory)
                             for ident, table in devices.items()}
    return values


DEVICE_FILE_KEYS = ("secret_file", "previous_secret_file")


def device_files_beside(table: Any, directory: str) -> Any:
    """A device table with its relative secret files made `directory`'s neighbours."""
    if not isinstance(table, dict):
        return table
    table = dict(table)
    for key in DEVICE_FILE_KEYS:
        name = table.get(key)
        if isinstance(name, str) and name and not os.path.isabs(name):
            table[key] = os.path.join(directory, name)
    return table

class SectionProblem(ValueError):
    """One line about a table: `table` as the file names it ("device", "server.devices.gw1")."""

    def __init__(self, table: str, text: str):
        super().__init__(text)
        self.table = table


MAX_SECRET_FILE = 4096   # bytes; a secret is short, and /dev/zero must not fill the memory
# The keys of a [server.devices.ID] table (and of a devices_dir file), with when a
# change applies: ServerApp ends the session of a device whose table changed (it
# redials), unless only its services did: their ports follow at once.
DEVICE_TABLE_KEYS = {"host": SESSION, "secret": SESSION, "secret_file": SESSION,
                      "previous_secret": SESSION, "previous_secret_file": SESSION,
                      "services": LIVE}
MAX_SERVICE_NAME = 32
MAX_SERVICES = 64   # per device: each is a listening port on the server


def finish_section(name: str, values: Dict[str, Any], allow_readable: bool = False) -> Any:
    """The settings of section `name` from checked single values: the checks
    across keys, and secrets, devices and `legacy` resolved. SectionProblem if not.
    `allow_readable`: the role's allow_readable_secrets, for a section without its own.

    `config set` passes values of a built section back in: a resolved Secret or
    devices mapping is kept as it is (files are not read again)."""
    if "heartbeat_timeout" in values and values["heartbeat_timeout"] <= values["heartbeat_interval"]:
        raise SectionProblem(name, "heartbeat_timeout (%s) must exceed heartbeat_interval (%s)"
                             % (values["heartbeat_timeout"], values["heartbeat_interval"]))
    if name == "device":
        _finish_device(values)
    elif name == "server":
        _finish_server(values)
    elif name == "cluster":
        _finish_cluster(values, allow_readable)
    return SECTION_TYPES[name](**values)


def _resolve_secret(table: str, secret: Any, path: str, allow_readable: bool,
                    key: str = "secret") -> Optional[Secret]:
    """`key` (a str from the file) or the content of `path` (key + "_file"), as a Secret."""
    if isinstance(secret, Secret):
        return secret
    if secret and path:
        raise SectionProblem(table, "%s and %s_file are exclusive: set one of them" % (key, key))
    if path:
        return _read_secret(table, path, allow_readable, key + "_file")
    if not secret:
        return None
    problem = secret_problem(secret)
    if problem:
        raise SectionProblem(table, "%s %s" % (key, problem))
    return Secret(secret.encode("utf-8"))


def _read_secret(table: str, path: str, allow_readable: bool, key: str) -> Secret:
    def fail(problem: str) -> SectionProblem:
        return SectionProblem(table, "%s %s: %s" % (key, printable(path), problem))
    try:
        content = read_regular_file(path, MAX_SECRET_FILE)
    except FileProblem as exc:
        raise fail(exc.problem) from None
    if readable_by_others(path, content.mode) and not allow_readable:
        section = "device" if table == "device" else "server"
        raise SectionProblem(table, "%s %s" % (key, unprotected(path, "a secret", section)))
    try:
        text = content.data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise fail("not UTF-8 text") from None
    if not text:
        raise fail("is empty")
    problem = secret_problem(text)
    if problem:
        raise fail("the %s in it %s" % ("token" if key.startswith("http_token") else "secret",
                                        problem))
    return Secret(text.encode("utf-8"))


def _check_files(table: str, values: Dict[str, Any], keys: Tuple[str, ...]) -> None:
    """TLS files: the pair cert/key complete, and every file readable now."""
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        given, missing = ("tls_cert", "tls_key") if values["tls_cert"] else ("tls_key", "tls_cert")
        raise SectionProblem(table, "%s is set but %s is not: they go together" % (given, missing))
    for key in keys:
        path = values[key]
        if path:
            try:
                check_regular_file(path)
            except FileProblem as exc:
                raise SectionProblem(table, "%s %s" % (key, exc)) from None


def _finish_device(values: Dict[str, Any]) -> None:
    secret = values["secret"] = _resolve_secret("device", values["secret"], values["secret_file"],
                                                values["allow_readable_secrets"])
    if values["id"] and secret is None:
        raise SectionProblem("device", "id %r needs secret or secret_file" % values["id"])
    if secret is not None and not values["id"]:
        raise SectionProblem("device", "a secret needs an id: set id as well (the server's "
                                       "[server.devices.ID] table)")
    tls_keys = [key for key in ("tls_ca", "tls_fingerprint", "tls_server_name", "tls_cert",
                                "tls_key") if values[key]]
    if values["protocol"] == "legacy":
        given = (["id"] if values["id"] else []) + (["tls"] if values["tls"] else []) + tls_keys
        if given:
            raise SectionProblem("device", "protocol = \"legacy\" contradicts %s: the legacy "
                                           "protocol has no identity and no TLS" % ", ".join(given))
    if tls_keys and not values["tls"]:
        raise SectionProblem("device", "%s is set but tls is false: set tls = true"
                             % " and ".join(tls_keys))
    if values["tls_ca"] and values["tls_fingerprint"]:
        raise SectionProblem("device", "tls_ca and tls_fingerprint exclude each other: a pin "
                                       "replaces the CA and name checks; set one of them")
    values["server"] = server_list(values["server"])
    if values["reconnect_min"] > values["reconnect_max"]:
        raise SectionProblem("device", "reconnect_min (%s) must not exceed reconnect_max (%s)"
                             % (values["reconnect_min"], values["reconnect_max"]))
    values["services"] = _services("device", values["services"], "local", _hostport(False))
    _check_files("device", values, ("tls_ca", "tls_cert", "tls_key"))
    if values["tls_fingerprint"]:
        values["tls_fingerprint"] = _normal_fingerprint(values["tls_fingerprint"])


def _finish_server(values: Dict[str, Any]) -> None:
    devices = values["devices"]
    if isinstance(devices, dict):   # the raw tables; a built mapping is kept
        values["devices"] = MappingProxyType(
            {ident: _device_entry(ident, table, values["allow_readable_secrets"])
             for ident, table in devices.items()})
    if values["legacy"] is None:
        values["legacy"] = not values["devices"] and not values["devices_dir"]
    values["http_token"] = _resolve_secret("server", values["http_token"],
                                           values["http_token_file"],
                                           values["allow_readable_secrets"], "http_token")
    _check_files("server", values, ("tls_cert", "tls_key", "tls_client_ca"))
    if values["tls_client_ca"] and not values["tls_cert"]:
        raise SectionProblem("server", "tls_client_ca needs tls_cert and tls_key (TLS on the "
                                       "uplink listener)")
    _check_hosts(values)


def _finish_cluster(values: Dict[str, Any], allow_readable: bool) -> None:
    for key, what in (("node", "this server's name in the cluster"),
                      ("etcd", "the etcd members' client URLs"),
                      ("peer_listen", "ADDR:PORT where the other servers forward clients")):
        if not values[key]:
            raise SectionProblem("cluster", "%s is required: %s" % (key, what))
    secret = values["secret"] = _resolve_secret("cluster", values["secret"], values["secret_file"],
                                                allow_readable)
    if secret is None:
        raise SectionProblem("cluster", "needs secret or secret_file (shared by the servers)")
    host, port = parse_hostport(values["peer_listen"], allow_empty_host=True, allow_zero_port=True)
    if not port:
        raise SectionProblem("cluster", "peer_listen %s: port 0 is no port the other servers "
                                        "can dial" % values["peer_listen"])
    if not values["peer_advertise"]:
        if host in WILDCARD_ADDRESSES:
            raise SectionProblem("cluster", "peer_listen %s is every address: set peer_advertise "
                                            "to the ADDR:PORT the other servers dial"
                                 % values["peer_listen"])
        values["peer_advertise"] = values["peer_listen"]


def device_table(ident: str) -> str:
    # ops.tomlwrite here and below, not at the top: a device never needs it unless
    # it saves its config (docs/benchmarks.md, third round).
    from . import tomlwrite
    return "server.devices." + tomlwrite.format_key(ident)


def _device_entry(ident: str, table: Any, allow_readable: bool) -> DeviceEntry:
    problem = _device_id(False)(ident)
    if problem:
        raise SectionProblem(device_table(ident), "device id " + problem)
    name = device_table(ident)
    if not isinstance(table, dict):
        raise SectionProblem("server.devices", "%s must be a table [%s]" % (ident, name))
    for key, value in table.items():
        if key not in DEVICE_TABLE_KEYS:
            hint = ""
            if isinstance(value, dict):   # [server.devices.gw.1]: a dotted id unquoted
                hint = "; an id with a dot is quoted: [server.devices.\"%s.%s\"]" % (ident, key)
            raise SectionProblem(name, "unknown key %r (%s)%s"
                                 % (key, suggest(key, DEVICE_TABLE_KEYS), hint))
        if key == "services":
            continue   # checked by _services
        if not isinstance(value, str):
            raise SectionProblem(name, "%s must be a string" % key
                                 + ("" if key in SECRET_KEYS else ", got %r" % (value,)))
    host = table.get("host")
    if not host:
        raise SectionProblem(name, "host is required: the ADDR:PORT where this device's "
                                   "clients connect")
    problem = _hostport(False, bind=True)(host)
    if problem:
        raise SectionProblem(name, "host " + problem)
    secret = _resolve_secret(name, table.get("secret", ""), table.get("secret_file", ""),
                             allow_readable)
    if secret is None:
        raise SectionProblem(name, "needs secret or secret_file")
    # Rotation: the old secret stays valid until the device has the new one.
    previous = _resolve_secret(name, table.get("previous_secret", ""),
                               table.get("previous_secret_file", ""), allow_readable,
                               "previous_secret")
    services = _services(name, table.get("services", {}), "host", _hostport(False, bind=True))
    return DeviceEntry(id=ident, secret=secret, host=host, previous=previous, services=services)


def _services(table: str, services: Any, key: str,
              check: Callable[[Any], Optional[str]]) -> Mapping[str, str]:
    """[TABLE.services.NAME] tables of one `key` ("ADDR:PORT") each: name -> value, read-only.
    A built mapping (`config set` passes one back) is kept."""
    if not isinstance(services, dict):
        if isinstance(services, MappingProxyType):
            return services
        raise SectionProblem(table, "services must be tables [%s.services.NAME]" % table)
    if len(services) > MAX_SERVICES:
        raise SectionProblem(table, "%d services: at most %d" % (len(services), MAX_SERVICES))
    found = {}
    for service, entry in services.items():
        if not 0 < len(service) <= MAX_SERVICE_NAME or not _ID_CHARS.issuperset(service):
            raise SectionProblem(table, "service name must be 1 to %d characters of A-Z a-z "
                                 "0-9 . _ -, got %r" % (MAX_SERVICE_NAME, service[:40]))
        from . import tomlwrite
        name = "%s.services.%s" % (table, tomlwrite.format_key(service))
        if not isinstance(entry, dict):
            raise SectionProblem(table, "services.%s must be a table [%s]" % (service, name))
        unknown = sorted(set(entry) - {key})
        if unknown:
            raise SectionProblem(name, "unknown key %r (%s)" % (unknown[0], suggest(unknown[0], [key])))
        value = entry.get(key)
        if not value:
            raise SectionProblem(name, "%s is required (ADDR:PORT)" % key)
        if not isinstance(value, str):
            raise SectionProblem(name, "%s must be a string, got %r" % (key, value))
        problem = check(value)
        if problem:
            raise SectionProblem(name, "%s %s" % (key, problem))
        found[service] = value
    return MappingProxyType(found)


def device_hosts(entry: DeviceEntry) -> List[Tuple[str, str, str]]:
    """(table, what, host) of every port a device has: its host, then its services'."""
    from . import tomlwrite
    table = device_table(entry.id)
    return [(table, "the host of device %r" % entry.id, entry.host)] + [
        ("%s.services.%s" % (table, tomlwrite.format_key(name)),
         "service %r of device %r" % (name, entry.id), host)
        for name, host in sorted(entry.services.items())]


def server_ports(values: Any) -> List[Tuple[str, str]]:
    """(what, ADDR:PORT) of the ports [server] itself listens on: listen, host, http."""
    ports = [("[server] listen", values["listen"]), ("[server] host", values["host"])]
    if values["http"]:
        ports.append(("[server] http", values["http"]))
    return ports


def _check_hosts(values: Dict[str, Any]) -> None:
    """Every device's host and service hosts can be bound beside the others and [server]
    listen, host and http."""
    taken = server_ports(values)
    for entry in values["devices"].values():
        for table, what, mine in device_hosts(entry):
            for owner, other in taken:
                if ports_collide(mine, other):
                    raise SectionProblem(table, "host %s collides with %s %s"
                                         % (mine, owner, other))
            taken.append((what, mine))


def replace_value(cfg: Config, section: str, key: str, value: Any) -> Any:
    """`config set`: `section` of cfg with key = value (checked alone already),
    checked across keys as at start. SectionProblem (one line) if not."""
    current = getattr(cfg, section)
    values = current._asdict()
    values[key] = value
    if section in ("device", "cluster") and key in ("secret", "secret_file"):
        # Resolve afresh. A secret that came from `secret` stays text, so
        # secret_file then meets it as exclusive; one read from a file is dropped.
        if key == "secret_file":
            from_key = current.secret is not None and not current.secret_file
            values["secret"] = current.secret.reveal().decode("utf-8") if from_key else ""
    if section == "server" and key in ("http_token", "http_token_file"):   # likewise
        if key == "http_token_file":
            from_key = current.http_token is not None and not current.http_token_file
            values["http_token"] = current.http_token.reveal().decode("utf-8") if from_key else ""
    return finish_section(section, values, _allow_readable(cfg.sections, cfg.role))


def _allow_readable(sections: Dict[str, Any], role: str) -> bool:
    """The role's allow_readable_secrets (built before the sections that lack one)."""
    own = sections.get(role)
    return bool(own is not None and own.allow_readable_secrets)


MAX_CONFIG_FILE = 4 * 1024 * 1024   # bytes: room for thousands of device tables


def read_toml_file(path: str, limit: int = MAX_CONFIG_FILE) -> Tuple[Dict[str, Any], FileContent]:
    """A TOML file read through read_regular_file (no FIFO or device blocks us, no
    endless file fills the memory): (its tables, the content and mode).
    ConfigError (one line) if it cannot be read or parsed."""
    content = read_regular_file(path, limit)
    try:
        return tomllib.loads(content.data.decode("utf-8")), content
    except UnicodeDecodeError as exc:
        raise ConfigError("%s: not UTF-8 text: %s" % (printable(path), exc)) from None
    except tomllib.TOMLDecodeError as exc:
        # The parser's message names a line and column, never the text: no secret leaks.
        raise ConfigError("%s: invalid TOML: %s" % (printable(path), exc)) from None


def load_config(path: Optional[str], role: str) -> Config:
    """Read and validate `path` (None: all defaults)."""
    if path is None:
        return build_config(role, {}, "defaults")
    raw, content = read_toml_file(path)
    cfg = build_config(role, raw, path, os.path.abspath(path))
    _check_inline_secrets(cfg, raw, path, content.mode)
    return cfg


def inline_secrets(role: str, raw: Dict[str, Any]) -> List[str]:
    """Where the tables of a file hold a secret themselves: "[device] secret", ..."""
    if role == "device":
        table = raw.get("device")
        return ["[device] secret"] if isinstance(table, dict) and table.get("secret") else []
    server = raw.get("server")
    if not isinstance(server, dict):
        return []
    cluster = raw.get("cluster")
    found = ["[server] http_token"] if server.get("http_token") else []
    if isinstance(cluster, dict) and cluster.get("secret"):
        found.append("[cluster] secret")
    devices = server.get("devices")
    if not isinstance(devices, dict):
        return found
    return found + ["[%s] %s" % (device_table(ident), key)
                    for ident, table in sorted(devices.items()) if isinstance(table, dict)
                    for key in ("secret", "previous_secret") if table.get(key)]


def _check_inline_secrets(cfg: Config, raw: Dict[str, Any], path: str, mode: int) -> None:
    """A file that others may read must not hold a secret (ssh refuses such a key)."""
    if not readable_by_others(path, mode) or getattr(cfg, cfg.role).allow_readable_secrets:
        return
    found = inline_secrets(cfg.role, raw)
    if found:
        what = "an inline secret (%s%s)" % (found[0], ", ..." if len(found) > 1 else "")
        raise ConfigError(unprotected(path, what, cfg.role))


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
    if kind is list or kind == (str, list):
        items = []
        for word in words:
            items.extend(part.strip() for part in word.split(",") if part.strip())
        # A string or a list ([device] server): as a file writes it, a string for one.
        return items if kind is list else server_value(tuple(items))
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
    old_bytes: Optional[bytes] = None
    try:
        old = read_regular_file(path, MAX_CONFIG_FILE)
        old_bytes = old.data
    except FileProblem as exc:
        if exc.errno != errno.ENOENT:
            raise ConfigError("cannot read %s" % exc) from None
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
        saved = build_config(cfg.role, base, path)   # never save what the next start refuses
        if old_bytes is not None:
            _check_inline_secrets(saved, base, path, old.mode)   # the file keeps its mode
        from . import tomlwrite
        text = tomlwrite.render(old_text, base, changes)
        tomlwrite.atomic_write(path, text)
    except ConfigError as exc:
        raise ConfigError("not saved: %s" % exc) from None
    except OSError as exc:
        raise ConfigError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    return path
