"""CommandParser: the one text command language of every channel.

A channel (serial console, control socket) hands it one line and gets back
the lines to answer: detail lines, then `OK`, or a single `ERROR reason`.
The parser never raises into its channel.
"""

import logging
import re
import shlex
import threading
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

from ..addr import format_hostport, parse_hostport, parse_port
from ..errors import CommandError, ConfigError
from . import tomlwrite
from .changes import HIDDEN, set_answer
from .config import (SCHEMA, SECRET_KEYS, Config, SectionProblem, check_value, close_match,
                     device_hosts, device_table, replace_value, save_config, server_value,
                     suggest, value_from_words)
from .config import one_line as _one_line
from .control import MAX_LINE   # noqa: F401 - the channels' limit, long imported from here

log = logging.getLogger("tcprc.commands")

OK = "OK"

_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


def _valid_address(text: str) -> bool:
    """An IPv4/IPv6 literal or an RFC 1123 host name."""
    import ipaddress   # only when a command names an address; it costs RSS at start
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253 or name.replace(".", "").isdigit():
        return False   # all digits: a mistyped IPv4 address, not a name
    return all(_LABEL.match(label) for label in name.split("."))


def _format_status_value(key: str, value: Any) -> str:
    if value is None or value == "":
        return "-"
    if key == "uptime" and isinstance(value, (int, float)):
        seconds = int(value)
        if seconds < 60:
            return "%ds" % seconds
        clock = "%d:%02d:%02d" % (seconds // 3600 % 24, seconds // 60 % 60, seconds % 60)
        if seconds >= 86400:
            clock = "%dd %s" % (seconds // 86400, clock)
        return "%ds (%s)" % (seconds, clock)
    if key == "rtt" and isinstance(value, (int, float)):   # seconds, smoothed (v2 PING)
        if value >= 1:
            return "%.2f s" % value
        return "%.1f ms" % (value * 1000)
    return _one_line(value)


_STATUS_ORDER = ("state", "protocol", "tls", "server", "servers", "listen", "host", "device",
                 "device_id", "local", "clients", "bytes_up", "bytes_down", "rtt", "uptime", "last_error",
                 "health")

_DEVICE_LINE = "%-16s %-5s %-21s %-20s %7s %9s %9s %8s %s"
_DEVICE_HEADER = ("ID", "STATE", "SOURCE", "SINCE (UTC)", "STREAMS", "UP", "DOWN", "RTT",
                  "LAST ERROR")


def _since(when: Any) -> str:
    if not when:
        return "-"
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(when))


def _size(count: int) -> str:
    """999 B, 12.3 KB, 4.6 MB, ..."""
    if count < 1000:
        return "%d B" % count
    value = float(count)
    for unit in ("KB", "MB", "GB", "TB"):
        value /= 1000
        if value < 1000:
            break
    return "%.1f %s" % (value, unit)


# `config set device.secret VALUE`, `... server.http_token VALUE` and the like: the
# value never reaches a log.
_SECRET_SET = re.compile(r"(?i)^(\s*config\s+set\s+\S*(?:secret|token)\S*)\s.*$")


def masked(line: str) -> str:
    """A command line as logs may show it: the value of a secret replaced."""
    return _SECRET_SET.sub(r"\1 " + HIDDEN, line)


class CommandParser:
    """Executes command lines against the running app and its Config.

    execute() is called concurrently by every channel: the serial console's
    thread and one thread per control connection; set_config() by the main
    thread on SIGHUP. That is safe because config get/set/save and
    set_config() hold self._lock (a set and a save never interleave, a reload
    never meets half a set), the tunnel commands and status only call the
    app's public methods, which lock for themselves, and the rest is per call.
    """

    def __init__(self, app: Any, cfg: Config,
                 appliers: Optional[Dict[str, Callable[[Any], None]]] = None):
        """`appliers`: section -> what applies new settings of it beside the app's own
        section (cli passes the Service's, for [log])."""
        self.app = app
        self.cfg = cfg
        self._appliers = dict(appliers or {})
        self._changes: Dict[Tuple[str, str], Any] = {}   # what `config set` did, for save
        self._lock = threading.Lock()                   # guards cfg and _changes

    @property
    def role(self) -> str:
        return self.cfg.role

    def set_config(self, cfg: Config) -> None:
        """Adopt a reloaded config (SIGHUP); pending `config set` values are dropped."""
        with self._lock:
            self.cfg = cfg
            self._changes = {}

    def execute(self, line: str) -> List[str]:
        """Answer one command line; a blank line gets no answer at all."""
        try:
            try:
                words = shlex.split(line)
            except ValueError as exc:
                raise CommandError("cannot parse the line: %s" % exc)
            if not words:
                return []
            command = _BY_NAME.get(words[0].lower())
            if command is None:
                raise CommandError("unknown command %r (type help for the list)"
                                   % _one_line(words[0]))
            if self.role not in command.roles:
                raise CommandError("%s is not available on the %s" % (command.name, self.role))
            return command.handler(self, words[1:])
        except CommandError as exc:
            return ["ERROR " + _one_line(exc)]
        except Exception as exc:  # a bug must not take the channel down
            log.exception("command %r failed", masked(line)[:200])
            return ["ERROR internal error: %s" % _one_line("%s: %s" % (type(exc).__name__, exc))]

    # -- tunnel ----------------------------------------------------------

    def _connect(self, args: List[str]) -> List[str]:
        server = local = None
        if len(args) in (0, 1) and all(arg == "" for arg in args):
            pass   # the legacy agents' TCPRemoteConnect(""): stored settings
        elif len(args) in (2, 4):
            server = self._endpoint("ServerAddress", args[0], "ServerPort", args[1], False)
            if len(args) == 4:
                local = self._endpoint("LocalAddress", args[2], "LocalPort", args[3], True)
        else:
            raise CommandError(
                "TCPRemoteConnect takes 0, 2 or 4 parameters "
                "(ServerAddress ServerPort [LocalAddress LocalPort]), got %d" % len(args))
        if local is not None and not local[0]:
            local = ("127.0.0.1", local[1])   # legacy: an empty LocalAddress is this device
        try:
            self.app.connect(server=server, local=local)
        except ValueError as exc:
            raise CommandError(str(exc) or "no server address: give ServerAddress ServerPort "
                               "or set device.server")
        return [OK]

    @staticmethod
    def _endpoint(addr_name: str, addr: str, port_name: str, port: str,
                  allow_empty: bool) -> Tuple[str, int]:
        try:
            number = parse_port(port)
        except ValueError as exc:
            raise CommandError("%s: %s" % (port_name, exc))
        if not addr and not allow_empty:
            raise CommandError("%s is empty" % addr_name)
        if addr and not _valid_address(addr):
            raise CommandError("%s %r is neither an IP address nor a host name"
                               % (addr_name, _one_line(addr)))
        # Then by the same rules as ADDR:PORT everywhere else.
        try:
            return parse_hostport(format_hostport(addr, number), allow_empty_host=allow_empty)
        except ValueError as exc:
            raise CommandError("%s %r: %s" % (addr_name, addr, exc))

    def _disconnect(self, args: List[str]) -> List[str]:
        if args:
            raise CommandError("TCPRemoteDisconnect takes no parameters, got %d" % len(args))
        self.app.disconnect()
        return [OK]

    def _status(self, args: List[str]) -> List[str]:
        if args:
            raise CommandError("status takes no parameters, got %d" % len(args))
        status = dict(self.app.status())
        keys = [key for key in _STATUS_ORDER if key in status]
        keys += sorted(key for key in status if key not in _STATUS_ORDER)
        return ["%s: %s" % (key, _format_status_value(key, status[key])) for key in keys] + [OK]

    def _health(self, args: List[str]) -> List[str]:
        if args:
            raise CommandError("health takes no parameters, got %d" % len(args))
        problems = self.app.health()
        if problems:
            raise CommandError("unhealthy: %s" % "; ".join(problems))
        return ["healthy", OK]

    # -- the fleet (server) --------------------------------------------------

    def _devices(self, args: List[str]) -> List[str]:
        if args:
            raise CommandError("devices takes no parameters, got %d" % len(args))
        rows = self.app.devices()
        cluster = any("node" in row for row in rows)   # the node column, in a cluster
        line = _DEVICE_LINE.replace("%-5s ", "%-5s %-10s ") if cluster else _DEVICE_LINE
        header = _DEVICE_HEADER[:2] + (("NODE",) if cluster else ()) + _DEVICE_HEADER[2:]
        lines = [line % header]
        for row in rows:
            error = _one_line(row["last_error"]) or "-"
            lines.append(line % ((row["id"], row["state"]) +
                                 ((row.get("node") or "-",) if cluster else ()) + (
                row["source"] or "-", _since(row["since"]),
                row["streams"], _size(row["bytes_up"]), _size(row["bytes_down"]),
                _format_status_value("rtt", row["rtt"]),
                error if len(error) <= 60 else error[:57] + "...")))
        return lines + ["%d device(s), %d up" % (len(rows), sum(r["state"] == "up" for r in rows)),
                        OK]

    def _cluster(self, args: List[str]) -> List[str]:
        if args:
            raise CommandError("cluster takes no parameters, got %d" % len(args))
        view = getattr(self.app, "cluster_view", None)
        found = view() if view is not None else None
        if found is None:
            raise CommandError("this server is in no cluster (no [cluster] table)")
        nodes, devices = found
        lines = ["%-12s %-21s %-14s %7s %s" % ("NODE", "PEER", "STATE", "DEVICES",
                                                "DEFINITIONS")]
        for node in nodes:
            lines.append("%-12s %-21s %-14s %7d %s%s" % (
                node.name, node.peer, "up" if node.up else "lease expired", node.devices,
                node.digest[:12], "  * differs from this server's" if node.differs else ""))
        lines.append("%-16s %-12s %s" % ("DEVICE", "NODE", "SINCE (UTC)"))
        for ident, node, since in devices:
            lines.append("%-16s %-12s %s" % (ident, node, _since(since)))
        return lines + ["%d node(s), %d up; %d device(s) held" % (
            len(nodes), sum(1 for n in nodes if n.up), len(devices)), OK]

    def _device(self, args: List[str]) -> List[str]:
        if len(args) != 1:
            raise CommandError("usage: device ID (see devices for the ids)")
        row = self._row(args[0])
        lines = []
        for key, value in row.items():
            if key == "since":
                value = _since(value)
            lines.append("%s: %s" % (key, _format_status_value(key, value)))
        return lines + [OK]

    def _kick(self, args: List[str]) -> List[str]:
        if len(args) != 1:
            raise CommandError("usage: kick ID (see devices for the ids)")
        self._row(args[0])
        if not self.app.kick(args[0]):
            raise CommandError("device %s has no session to close" % _one_line(args[0]))
        return ["device %s: session closed (the device may redial)" % args[0], OK]

    def _row(self, ident: str) -> Dict[str, Any]:
        for row in self.app.devices():
            if row["id"] == ident:
                return row
        raise CommandError("no device %r (see devices for the ids)" % _one_line(ident)[:80])

    # -- config ------------------------------------------------------------

    def _config(self, args: List[str]) -> List[str]:
        if not args:
            raise CommandError("config needs get, set or save (see help config)")
        action, rest = args[0].lower(), args[1:]
        with self._lock:
            if action == "get":
                return self._config_get(rest)
            if action == "set":
                return self._config_set(rest)
            if action == "save":
                return self._config_save(rest)
        raise CommandError("unknown config action %r (get, set or save)" % _one_line(args[0]))

    def _split_key(self, text: str) -> Tuple[str, str]:
        schema = SCHEMA[self.role]
        section, dot, key = text.partition(".")
        if section not in schema:
            raise CommandError("unknown section %r (%s)"
                               % (_one_line(section), suggest(section, sorted(schema))))
        if not dot or key not in schema[section]:
            known = sorted(schema[section])
            close = close_match(key, known) if dot else None
            hint = ("did you mean %s.%s?" % (section, close) if close else
                    "known in [%s]: %s" % (section, ", ".join(known)))
            raise CommandError("unknown key %r (%s)" % (_one_line(text), hint))
        self._require_table(section)
        return section, key

    def _require_table(self, section: str) -> None:
        """An optional table ([cluster]) the file does not have has no keys to show or set."""
        if getattr(self.cfg, section) is None:
            raise CommandError("no [%s] table in the configuration: add it to the file and "
                               "restart" % section)

    def _config_get(self, args: List[str]) -> List[str]:
        if len(args) != 1:
            raise CommandError("usage: config get KEY (for example config get device.server)")
        if args[0] in SCHEMA[self.role]:
            section = args[0]
            self._require_table(section)
            lines: List[str] = []
            for key in SCHEMA[self.role][section]:
                lines += self._shown(section, key)
            return lines + [OK]
        if self.role == "server" and args[0].startswith("server.devices."):
            return self._device_get(args[0]) + [OK]
        section, key = self._split_key(args[0])
        return self._shown(section, key) + [OK]

    def _shown(self, section: str, key: str) -> List[str]:
        """`config get` lines of one key: secrets hidden, devices as ids and hosts."""
        value = getattr(getattr(self.cfg, section), key)
        if key == "devices":
            if not value:
                return ["server.devices = (none)"]
            return ["%s.host = %s" % (table, tomlwrite.format_value(host))
                    for entry in value.values() for table, _, host in device_hosts(entry)]
        if key == "services":   # [device.services.NAME] tables
            if not value:
                return ["%s.services = (none)" % section]
            return ["%s.services.%s.local = %s" % (section, tomlwrite.format_key(name),
                                                   tomlwrite.format_value(local))
                    for name, local in sorted(value.items())]
        if key in SECRET_KEYS:
            return ["%s.%s = %s" % (section, key, HIDDEN if value is not None else '""')]
        if section == "device" and key == "server":   # as a file writes it: a list for several
            value = server_value(value)
        return ["%s.%s = %s" % (section, key, tomlwrite.format_value(value))]

    def _device_get(self, text: str) -> List[str]:
        """server.devices.ID[.KEY]: the host shows, every other key of the table is hidden."""
        devices = self.cfg.server.devices
        rest = text[len("server.devices."):]
        ident, key = rest, ""
        if rest not in devices:
            ident, _, key = rest.rpartition(".")
        if ident not in devices:
            raise CommandError("no device %r in server.devices (known: %s)"
                               % (_one_line(rest), ", ".join(sorted(devices)) or "none"))
        if key and key not in ("host", "secret", "secret_file"):
            raise CommandError("unknown key %r (known in [%s]: host, secret, secret_file)"
                               % (_one_line(key), device_table(ident)))
        host = "%s.host = %s" % (device_table(ident), tomlwrite.format_value(devices[ident].host))
        secret = "%s.secret = %s" % (device_table(ident), HIDDEN)
        if key == "host":
            return [host]
        if key:
            return ["%s.%s = %s" % (device_table(ident), key, HIDDEN)]
        return [host, secret] + ["%s.host = %s" % (table, tomlwrite.format_value(host))
                                 for table, _, host in device_hosts(devices[ident])[1:]]

    def _config_set(self, args: List[str]) -> List[str]:
        if len(args) < 2:
            raise CommandError("usage: config set KEY VALUE (for example config set "
                               "device.server 203.0.113.5:9000)")
        section, key = self._split_key(args[0])
        spec = SCHEMA[self.role][section][key]
        if spec.type is dict:
            raise CommandError("%s is a set of tables: edit the configuration file and reload "
                               "(SIGHUP)" % args[0])
        try:
            value = value_from_words(args[0], spec.type, args[1:])
        except ValueError as exc:
            raise CommandError(str(exc))
        try:
            value = check_value(self.role, section, key, value)
            updated = replace_value(self.cfg, section, key, value)
        except SectionProblem as exc:
            where = "" if exc.table == section else "[%s] " % exc.table
            raise CommandError("%s: %s%s" % (args[0], where, exc))
        except ValueError as exc:
            raise CommandError("%s: %s" % (args[0], exc))
        before = getattr(self.cfg, section)
        apply = self.app.apply_settings if section == self.role else self._appliers.get(section)
        if apply is not None:
            # The app compares old and new settings, so it gets a new object.
            try:
                apply(updated)
            except Exception as exc:
                log.warning("config set %s: could not apply: %s", args[0], exc)
                raise CommandError("%s: could not apply: %s" % (args[0], exc))
        detail = set_answer(self.role, section, key, before, updated,
                            self.cfg.started.get(section), apply is not None)
        self.cfg.sections[section] = updated
        self._changes[(section, key)] = value
        log.info("config set %s", detail)
        return [detail, OK]

    def _config_save(self, args: List[str]) -> List[str]:
        if args:
            raise CommandError("config save takes no parameters, got %d" % len(args))
        try:
            path = save_config(self.cfg, self._changes)
        except ConfigError as exc:
            raise CommandError(str(exc))
        log.info("config saved to %s (%d setting(s) changed)", path, len(self._changes))
        return ["saved %d changed setting(s) to %s" % (len(self._changes), path), OK]

    # -- help --------------------------------------------------------------

    def _help(self, args: List[str]) -> List[str]:
        if len(args) > 1:
            raise CommandError("help takes at most one parameter, got %d" % len(args))
        if not args:
            # Two lines per command: fits an 80-column serial terminal.
            lines = []
            for command in COMMANDS:
                if self.role in command.roles:
                    lines += [command.syntax, "    " + command.summary]
            return lines + ["Command names are case-insensitive; help COMMAND for details.", OK]
        command = _BY_NAME.get(args[0].lower())
        if command is None:
            raise CommandError("unknown command %r (type help for the list)" % _one_line(args[0]))
        lines = [command.syntax, "  " + command.summary] + ["  " + line for line in command.help]
        if self.role not in command.roles:
            lines.append("  (not available on the %s)" % self.role)
        return lines + [OK]


class Command(NamedTuple):
    """One command: what help shows, who may run it, and the method that runs it."""
    name: str                   # as help spells it; typed in any case
    roles: Tuple[str, ...]      # agents that run it; the others answer "not available"
    syntax: str
    summary: str                # one line in `help`
    help: Sequence[str]         # further lines in `help NAME`
    handler: Callable[[CommandParser, List[str]], List[str]]


BOTH = ("device", "server")

# The one table: dispatch, `help` and the role restriction all read it, in this order.
COMMANDS: Tuple[Command, ...] = (
    Command("TCPRemoteConnect", ("device",),
            "TCPRemoteConnect [ServerAddress ServerPort [LocalAddress LocalPort]]",
            "start (or restart) the tunnel",
            ("No parameters, or one empty string \"\": use device.server and",
             "device.local from the configuration (a list of servers: tried in order).",
             "Two: dial ServerAddress:ServerPort (only it, not the list), clients go to",
             "device.local.",
             "Four: dial ServerAddress:ServerPort, clients go to LocalAddress:LocalPort",
             "(an empty LocalAddress \"\" means this device, 127.0.0.1).",
             "Example: TCPRemoteConnect 203.0.113.5 9000 127.0.0.1 22"),
            CommandParser._connect),
    Command("TCPRemoteDisconnect", ("device",), "TCPRemoteDisconnect",
            "close the tunnel and all its streams, stay idle", (), CommandParser._disconnect),
    Command("status", BOTH, "status",
            "uplink state, addresses, clients, bytes each way, uptime, last error", (),
            CommandParser._status),
    Command("health", BOTH, "health",
            "OK while every thread the agent needs runs and makes progress",
            ("ERROR unhealthy: ... names a critical thread that has ended or made no",
             "progress for too long (the supervisor or link loop of a device, the",
             "uplink acceptor or devices_dir scanner of a server): the tunnel is",
             "dead although the process lives. `tcprc ctl health` exits 1 then, and",
             "the init script's `check` (run by tcprc-watchdog) restarts the agent."),
            CommandParser._health),
    Command("devices", ("server",), "devices",
            "the device table: id, state, source, since, streams, bytes each way, rtt, last error",
            ("One line per configured device ([server.devices] and devices_dir), and",
             "\":legacy\" for the session on [server] host while one is up.",
             "UP: bytes from the device, DOWN: bytes to it, over all its sessions."),
            CommandParser._devices),
    Command("cluster", ("server",), "cluster",
            "the cluster: each server (node), and which one holds each device",
            ("One line per node: its name, the address the others forward clients to,",
             "up (its lease lives) or lease expired, the devices it holds, and a digest",
             "of its device definitions, marked when it differs from this server's (the",
             "servers of a cluster must be given the same devices). Then one line per",
             "device held anywhere: its id, its node, since when."),
            CommandParser._cluster),
    Command("device", ("server",), "device ID",
            "one device in detail (sessions started, auth failures, refused clients, ...)", (),
            CommandParser._device),
    Command("kick", ("server",), "kick ID",
            "close a device's session (the device may redial)", (),
            CommandParser._kick),
    Command("config", BOTH, "config get KEY | config set KEY VALUE | config save",
            "read, change and save settings",
            ("KEY is section.key, e.g. device.server; `config get SECTION` lists a section.",
             "config set changes the running agent and answers what became of the value:",
             "applied at once; applied by restarting the tunnel (device) or the sessions",
             "it affects (server); applied to new uplinks (server TLS and limits); or",
             "needs a restart (server.listen, control, console, cluster): the running",
             "agent keeps its value, config save keeps the new one for the next start.",
             "Booleans: true/false, yes/no, on/off, 1/0. Lists: several values, or",
             "comma-separated; \"\" for an empty value or list.",
             "config save writes the settings to the configuration file (atomically,",
             "keeping comments and every key that was not set)."),
            CommandParser._config),
    Command("help", BOTH, "help [COMMAND]", "list the commands, or explain one", (),
            CommandParser._help),
)
_BY_NAME = {command.name.lower(): command for command in COMMANDS}
