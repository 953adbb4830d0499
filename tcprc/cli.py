"""Command-line entry points: `tcprc device|server|ctl|demo ...`.

device, server: run_agent wires argv -> config -> app -> channels -> service.
ctl: one command to a running agent (ops/ctl.py). demo: a tunnel on 127.0.0.1.
"""

import argparse
import os
import logging
import sys
import threading
from typing import Any, List, Optional

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


def build_parser() -> argparse.ArgumentParser:
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
    device.add_argument("--protocol", choices=("auto", "legacy", "v2"),
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


def refuse_extra_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace,
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


def load_role_config(role: str, args: argparse.Namespace) -> Config:
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


def add_service_arguments(parser: argparse.ArgumentParser) -> None:
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
    from .ops.tomlwrite import remove_stale_temps
    removed, failed = remove_stale_temps(config_path)
    log = logging.getLogger("tcprc")
    if removed:
        log.info("removed %d stale temporary file(s) of an interrupted config save of %s",
                 len(removed), config_path)
    if failed:
        log.warning("cannot remove stale temporary file %s (%d in all)", failed[0], len(failed))


def run_agent(role: str, args: argparse.Namespace) -> int:
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
    from .ops.commands import CommandParser
    from .ops.channels import start_channels
    commands = CommandParser(app, cfg, appliers={"log": service.apply_log})
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


def _run_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(args.megabytes)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if extras:
        refuse_extra_arguments(parser, args, extras)
    return args.func(args)
