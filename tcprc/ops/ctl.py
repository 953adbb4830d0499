"""`tcprc ctl COMMAND`: send one command line to the running agent's control socket.

Runs in its own short-lived process; exit status 0 on OK, 1 on ERROR, 2 when
no agent answers.

`ctl -c SERVER.toml device add ID --host ADDR:PORT` is the exception: it runs
here, not in the server (ops/devadd.py).

Without --role, the role is the config file's: a [server] table means the
server, [device] or [console] the device; neither or both: the device, as
without -c.  Inferring it says so in one line on stderr.
"""

import argparse
import shlex
import socket
import sys
from typing import List

from ..errors import ConfigError
from .config import load_config, read_toml_file

EXIT_OK, EXIT_ERROR, EXIT_NO_AGENT = 0, 1, 2


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value <= 3600:
        raise argparse.ArgumentTypeError("expected seconds between 0 and 3600, got %r" % text)
    return value


def add_ctl_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-c", "--config", metavar="FILE",
                        help="config file of the agent (for its [control] socket)")
    parser.add_argument("--role", choices=("device", "server"),
                        help="which agent's config to read (default: the one -c FILE is for, "
                             "else device)")
    parser.add_argument("--socket", metavar="PATH", help="control socket path (overrides -c)")
    parser.add_argument("--timeout", metavar="S", type=_seconds, default=10.0,
                        help="seconds to wait for the answer (default: 10)")
    parser.add_argument("--host", metavar="ADDR:PORT",
                        help="device add: where the new device's clients connect (a fixed port)")
    parser.add_argument("--local", metavar="ADDR:PORT",
                        help="device add: the service on the device its clients reach "
                             "(default: [device] local's default)")
    parser.add_argument("--server", metavar="ADDR:PORT",
                        help="device add: the address the device dials (default: [server] listen)")
    parser.add_argument("--device-config", metavar="FILE",
                        help="device add: write the device's config to FILE (mode 0600, with "
                             "ID.secret beside it) instead of printing it")
    parser.add_argument("--inline-secret", action="store_true",
                        help="device add: put the secret in the device's config, not in ID.secret")
    parser.add_argument("command", nargs="+", metavar="COMMAND",
                        help="a command and its parameters, e.g. status")


def infer_role(args: argparse.Namespace) -> str:
    """--role, else the role of the -c FILE's tables (one line on stderr says which),
    else device."""
    if args.role or not args.config:
        return args.role or "device"
    try:
        raw, _ = read_toml_file(args.config)
    except ConfigError:
        return "device"   # load_config reports it
    server = "server" in raw
    device = "device" in raw or "console" in raw
    if server != device:
        role = "server" if server else "device"
        why = "it has a [%s] table" % ("device" if "device" in raw else "console" if device
                                       else "server")
    else:
        role = "device"
        why = "it has %s, so the default" % ("[server] and [device]/[console] tables" if server
                                              else "no [server], [device] or [console] table")
    print("tcprc ctl: role %s, from %s: %s (--role to choose)" % (role, args.config, why),
          file=sys.stderr)
    return role


def socket_path(args: argparse.Namespace) -> str:
    """--socket, else [control] socket of -c FILE (or of the role's defaults)."""
    if args.socket:
        return args.socket
    cfg = load_config(args.config, args.role)
    return cfg.control.socket


def send_command(path: str, line: str, timeout: float) -> List[str]:
    """One command, its answer lines; OSError/ConnectionError if nobody answers."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        try:
            sock.sendall(line.encode("utf-8") + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass   # refused before it read us (busy): its answer is still there to read
        lines: List[str] = []
        buf = bytearray()
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                raise ConnectionError("the agent closed the connection without an answer")
            buf += chunk
            while b"\n" in buf:
                end = buf.index(b"\n")
                text = buf[:end].decode("utf-8", errors="replace")
                del buf[:end + 1]
                lines.append(text)
                if text == "OK" or text.startswith("ERROR"):
                    return lines


DEVICE_ADD_USAGE = ("usage: tcprc ctl -c SERVER.toml device add ID --host ADDR:PORT "
                    "[--local ADDR:PORT] [--server ADDR:PORT] [--device-config FILE] "
                    "[--inline-secret]")


def device_add(args: argparse.Namespace) -> int:
    """`device add ID --host ADDR:PORT` (server role): the device's file in devices_dir
    and its own config (ops/devadd.py)."""
    from .devadd import plan_device, server_state, write_device, device_config_text
    if args.role != "server" or len(args.command) != 3 or not args.host:
        print("tcprc ctl: %s" % DEVICE_ADD_USAGE, file=sys.stderr)
        return EXIT_ERROR
    ident = args.command[2]
    try:
        cfg = load_config(args.config, "server")
        device = plan_device(cfg, ident, args.host, args.server, args.local)
        written = write_device(cfg, device, args.device_config, args.inline_secret)
    except ConfigError as exc:
        print("tcprc ctl: device add: %s" % exc, file=sys.stderr)
        return EXIT_ERROR
    print("wrote %s (mode 0600): device %s, its clients connect to %s"
          % (written[-1], ident, device.host))
    if device.tls is not None:
        print("TLS: %s" % device.tls.note)
    if args.device_config:
        print("wrote %s (mode 0600): the device's config, for `tcprc device -c FILE`; copy "
              "it with the file(s) beside it to the device" % ", ".join(written[:-1]))
    else:
        print("id: %s" % ident)
        print("secret: %s" % device.secret)
        print("server: %s" % device.server)
        if device.tls is not None and device.tls.ca_source:
            print("copy %s to ca.crt beside the device's config" % device.tls.ca_source)
        print("")
        where = "in it" if args.inline_secret else \
            "the secret above in %s.secret beside it (mode 0600)" % ident
        print("# the device's config (tcprc device -c FILE), %s:" % where)
        sys.stdout.write(device_config_text(device, args.inline_secret, cfg.path))
    print(server_state(cfg, ident, lambda path, line: send_command(path, line, 2.0)))
    return EXIT_OK


def ctl_main(args: argparse.Namespace) -> int:
    """`tcprc ctl`: 0 on OK, 1 on ERROR, 2 when no agent answers."""
    args.role = infer_role(args)
    if [word.lower() for word in args.command[:2]] == ["device", "add"] and \
            (len(args.command) > 2 or args.host):
        return device_add(args)
    try:
        path = socket_path(args)
    except ConfigError as exc:
        print("tcprc ctl: %s" % exc, file=sys.stderr)
        return EXIT_NO_AGENT
    if not path:
        print("tcprc ctl: no control socket configured ([control] socket is empty); "
              "use --socket PATH", file=sys.stderr)
        return EXIT_NO_AGENT
    # Quote each word so `ctl TCPRemoteConnect ""` reaches the agent as typed.
    line = " ".join(shlex.quote(word) for word in args.command)
    try:
        lines = send_command(path, line, args.timeout)
    except socket.timeout:
        print("tcprc ctl: no answer from the agent on %s within %gs" % (path, args.timeout),
              file=sys.stderr)
        return EXIT_NO_AGENT
    except OSError as exc:
        reason = exc.strerror or str(exc)
        print("tcprc ctl: no agent answers on %s: %s" % (path, reason), file=sys.stderr)
        return EXIT_NO_AGENT
    for text in lines:
        print(text)
    return EXIT_OK if lines[-1] == "OK" else EXIT_ERROR
