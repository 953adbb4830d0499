"""Command-line entry points: `tcprc device|server|ctl|demo ...`.

device, server: run_agent wires argv -> config -> app -> channels -> service.
ctl: one command to a running agent (ops/ctl.py). demo: a tunnel on 127.0.0.1.
"""

import os
import logging
import sys
import threading
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple, Union

if TYPE_CHECKING:   # imported where a parser is built: an agent started normally never needs it
    import argparse

from . import __version__
from .errors import ConfigError
from .ops.config import Config, load_config, with_overrides
from .ops.service import Service

# Pump threads copy bytes; they never recurse deeply.  A small stack keeps
# 255 idle streams cheap on a 64 MB gateway.
WORKER_STACK = 256 * 1024

_ROLE_FLAGS = {
    "device": (("--server", "server"), ("--local", "local"), ("--id", "id"),
               ("--secret-file", "secret_file"), ("--protocol", "protocol")),
    "server": (("--listen", "listen"), ("--host", "host")),
}

PROTOCOLS = ("auto", "legacy", "v2")

# The flags of `tcprc device|server` as build_parser() defines them, for
# parse_agent_args: (option strings, dest, kind); kind is "value", "append"
# (repeatable), "flag" (no value) or the tuple of allowed values.
# tests/test_cli_parse.py checks this table against the argparse parser.
_Flag = Tuple[Tuple[str, ...], str, Union[str, Tuple[str, ...]]]
_SERVICE_FLAGS: Tuple[_Flag, ...] = ((("--daemon",), "daemon", "flag"), (("--pidfile",), "pidfile", "value"))
_AGENT_FLAGS: Dict[str, Tuple[_Flag, ...]] = {
    "device": ((("-c", "--config"), "config", "value"), (("--server",), "server", "append"),
               (("--local",), "local", "value"), (("--id",), "id", "value"),
               (("--secret-file",), "secret_file", "value"), (("--protocol",), "protocol", PROTOCOLS),
               (("--console",), "console", "value")) + _SERVICE_FLAGS,
    "server": ((("-c", "--config"), "config", "value"), (("--listen",), "listen", "value"),
               (("--host",), "host", "value")) + _SERVICE_FLAGS,
}


def parse_agent_args(argv: List[str]) -> Optional[SimpleNamespace]:
    """`device ...` or `server ...` read without argparse, or None: argparse reads it.

    argparse and the parser it builds cost an idle agent about 1 MB of its RSS
    (docs/benchmarks.md), and an init script starts the agent with a few
    well-formed flags.  Only what argparse reads exactly the same way is taken
    here: the subcommand's own flags in full, `--flag VALUE`, `--flag=VALUE`
    or `-c VALUE`, a value neither empty nor starting with "-".  Anything else
    (--help, an error, an abbreviation, -cFILE, a value like "-1") is left to
    argparse, so every message stays its own.  The namespace holds what
    argparse's would, but `func`."""
    if not argv or argv[0] not in _AGENT_FLAGS:
        return None
    role = argv[0]
    values: Dict[str, Any] = {"command": role, "subcommand": role}
    known = {}
    for flags, dest, kind in _AGENT_FLAGS[role]:
        values[dest] = False if kind == "flag" else None
        for flag in flags:
            known[flag] = (dest, kind)
    i = 1
    while i < len(argv):
        word = argv[i]
        i += 1
        flag, equals, value = word.partition("=") if word.startswith("--") else (word, "", "")
        if flag not in known:
            return None
        dest, kind = known[flag]
        if kind == "flag":
            if equals:
                return None
            values[dest] = True
            continue
        if not equals:
            if i == len(argv):
                return None
            value = argv[i]
            i += 1
        if not value or value.startswith("-") or (isinstance(kind, tuple) and value not in kind):
            return None
        if kind == "append":
            values[dest] = (values[dest] or []) + [value]
        else:
            values[dest] = value
    return SimpleNamespace(**values)


def build_parser() -> "argparse.ArgumentParser":
    import argparse
    parser = argparse.ArgumentParser(
        prog="tcprc", description="TCP remote connection: reach a service on a device behind NAT.")
    parser.add_argument("--version", action="version", version="tcprc " + __version__)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    device = sub.add_parser("device", help="run the device side (dials out to the server)")
    device.add_argument("-c", "--config", metavar="FILE", help="TOML config (see etc/tcprc.toml)")
    device.add_argument("--server", metavar="ADDR:PORT", action="append",
                        help="ServerAddress:ServerPort to dial; repeated: servers tried in order "
                             "(together they replace [device] server)")
    device.add_argument("--local", metavar="ADDR:PORT", help="LocalAddress:LocalPort of the service")
    device.add_argument("--id", metavar="ID", help="this device's identity on the server (v2)")
    device.add_argument("--secret-file", metavar="FILE",
                        help="file holding the secret of --id (replaces [device] secret)")
    device.add_argument("--protocol", choices=PROTOCOLS,
                        help="uplink protocol: auto (v2 when the server offers it), legacy, v2")
    device.add_argument("--console", metavar="PORT",
                        help="serial console on PORT (/dev/ttyS0, a pty or a pyserial URL)")
    add_service_arguments(device)
    device.set_defaults(func=lambda args: run_agent("device", args))

    server = sub.add_parser("server", help="run the server side (devices dial in, clients connect)")
    server.add_argument("-c", "--config", metavar="FILE", help="TOML config (see etc/tcprc-server.toml)")
    server.add_argument("--listen", metavar="ADDR:PORT", help="ServerAddress:ServerPort for device uplinks")
    server.add_argument("--host", metavar="ADDR:PORT", help="HostAddress:HostPort for clients")
    add_service_arguments(server)
    server.set_defaults(func=lambda args: run_agent("server", args))

    ctl = sub.add_parser("ctl", help="send one command to the running agent (exit 0 OK, 1 ERROR, "
                                     "2 no agent)")
    from .ops.ctl import add_ctl_arguments, ctl_main
    add_ctl_arguments(ctl)
    ctl.set_defaults(func=ctl_main)

    demo = sub.add_parser("demo", help="run server, device and a service on 127.0.0.1 and show a tunnel")
    demo.add_argument("--megabytes", type=int, default=32, metavar="N",
                      help="bytes pushed each way in the bulk test (default 32)")
    demo.set_defaults(func=_run_demo)
    parser.subcommands = {"device": device, "server": server, "ctl": ctl, "demo": demo}
    for name, subparser in parser.subcommands.items():
        subparser.set_defaults(subcommand=name)   # ctl's COMMAND words take args.command
    return parser


def refuse_extra_arguments(parser: "argparse.ArgumentParser", args: "argparse.Namespace",
                           extras: List[str]) -> None:
    """Arguments no parser took: the subcommand's usage and error (exit 2), with a
    "did you mean" for a mistyped flag, rather than the top-level usage that a
    plain parse_args prints for `tcprc server --lisen`."""
    import difflib
    sub = parser.subcommands.get(getattr(args, "subcommand", None), parser)
    flags = sorted(sub._option_string_actions)   # every --flag and -f of the subcommand
    message = "unrecognized arguments: %s" % " ".join(extras)
    for word in extras:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], flags, n=1, cutoff=0.6)
            if close:
                message += " (did you mean %s?)" % close[0]
                break
    sub.error(message)


def load_role_config(role: str, args: Any) -> Config:
    """The config file (or defaults) with this role's command-line flags on top."""
    cfg = load_config(args.config, role)
    overrides = []
    for flag, key in _ROLE_FLAGS[role]:
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            if key == "server" and len(value) == 1:   # --server repeatable: a list for several
                value = value[0]
            if key == "secret_file":   # the shell's file, not the config file's neighbour
                value = os.path.abspath(value)
            overrides.append((role, key, value, flag))
            if key == "secret_file":   # the file's own secret gives way, not "exclusive"
                overrides.append((role, "secret", "", flag))
    return with_overrides(cfg, overrides) if overrides else cfg


def add_service_arguments(parser: "argparse.ArgumentParser") -> None:
    parser.add_argument("--daemon", action="store_true",
                        help="detach; log to syslog unless [log] target says otherwise")
    parser.add_argument("--pidfile", metavar="FILE",
                        help="write and lock FILE; refuse to start while another agent holds it")


def make_app(cfg: Config) -> Any:
    if cfg.role == "device":
        from .device.app import DeviceApp
        return DeviceApp(cfg.device)
    from .server.app import ServerApp
    from .ops.devdir import DeviceFiles

    made: List[Any] = []   # the app, once built (it reads devices_dir while it is built)

    def allow_readable() -> bool:
        # The flag as the app has it now: `config set` and SIGHUP change it.
        return (made[0].settings if made else cfg.server).allow_readable_secrets
    app = ServerApp(cfg.server, device_files=lambda path: DeviceFiles(path, allow_readable))
    made.append(app)
    if cfg.cluster is not None:   # only then: a server without [cluster] never loads it
        from .cluster.app import Cluster
        app.use_cluster(Cluster(cfg.cluster, cfg.server, app.deliver,
                                devices=app.fleet.devices.values()))
    return app


def remove_stale_save_temps(config_path: str) -> None:
    """A `config save` killed mid-write leaves its temporary file: clear them."""
    from .ops.savetemps import remove_stale_temps
    removed, failed = remove_stale_temps(config_path)
    log = logging.getLogger("tcprc")
    if removed:
        log.info("removed %d stale temporary file(s) of an interrupted config save of %s",
                 len(removed), config_path)
    if failed:
        log.warning("cannot remove stale temporary file %s (%d in all)", failed[0], len(failed))


def run_agent(role: str, args: Any) -> int:
    """`args`: argparse's namespace, or parse_agent_args' with the same values."""
    try:
        cfg = load_role_config(role, args)
    except ConfigError as exc:
        print("tcprc: %s" % exc, file=sys.stderr)
        return 2
    console_port = getattr(args, "console", None)
    if console_port:
        from .ops.console import INSTALL_HINT, serial_available
        if not serial_available():
            print("tcprc: --console: %s" % INSTALL_HINT, file=sys.stderr)
            return 2
    service = Service(args, cfg)   # detach, [log], pidfile, signals
    if not service.start():
        return service.status
    if args.config:
        remove_stale_save_temps(args.config)
    threading.stack_size(WORKER_STACK)
    app = make_app(cfg)
    try:
        app.start()
    except OSError as exc:
        service.stop()
        return service.fail("tcprc: cannot start the %s: %s" % (role, exc.strerror or exc))
    from .ops.channels import DeferredCommands, start_channels
    commands = DeferredCommands(app, cfg, appliers={"log": service.apply_log})
    channels = start_channels(commands, cfg, console_port)
    service.ready()

    def reload() -> None:
        service.reload(lambda: load_role_config(role, args), app)
        if service.cfg is not commands.cfg:   # reloaded: config get/save see the new file
            commands.set_config(service.cfg)

    try:
        service.wait(reload)
    finally:
        app.close()        # streams, then uplinks
        channels.close()
        service.stop()     # the pidfile last
    logging.getLogger("tcprc").info("stopped")
    return 0


def _run_demo(args: "argparse.Namespace") -> int:
    from .demo import run_demo
    return run_demo(args.megabytes)


def main(argv: Optional[List[str]] = None) -> int:
    agent = parse_agent_args(sys.argv[1:] if argv is None else argv)
    if agent is not None:
        return run_agent(agent.command, agent)
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        refuse_extra_arguments(parser, args, extras)
    return args.func(args)
