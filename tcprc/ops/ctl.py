"""`tcprc ctl COMMAND`: send one command line to the running agent's control socket.

Runs in its own short-lived process; exit status 0 on OK, 1 on ERROR, 2 when
no agent answers.

`ctl --role server device add ID --host ADDR:PORT` is the exception: it runs
here, not in the server.  It writes ID.toml into the [server] devices_dir of
the server's config file (-c), and the server picks it up by itself (scan or
SIGHUP).  So the fresh secret never crosses the control socket or reaches
the server's log, it needs no running server, and the file belongs to
whoever may write the directory, like the config file.
"""

import argparse
import shlex
import socket
import sys
from typing import List

from ..errors import ConfigError
from .config import load_config

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
    parser.add_argument("--role", choices=("device", "server"), default="device",
                        help="which agent's config to read (default: device)")
    parser.add_argument("--socket", metavar="PATH", help="control socket path (overrides -c)")
    parser.add_argument("--timeout", metavar="S", type=_seconds, default=10.0,
                        help="seconds to wait for the answer (default: 10)")
    parser.add_argument("--host", metavar="ADDR:PORT",
                        help="device add: where the new device's clients connect")
    parser.add_argument("command", nargs="+", metavar="COMMAND",
                        help="a command and its parameters, e.g. status")


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


def device_add(args: argparse.Namespace) -> int:
    """`device add ID --host ADDR:PORT` (server role): write the device's file."""
    from .devdir import add_device, device_instructions
    if args.role != "server" or len(args.command) != 3 or not args.host:
        print("tcprc ctl: usage: tcprc ctl --role server -c SERVER.toml device add ID "
              "--host ADDR:PORT", file=sys.stderr)
        return EXIT_ERROR
    try:
        cfg = load_config(args.config, "server")
        path, secret = add_device(cfg.server.devices_dir, args.command[2], args.host)
    except ConfigError as exc:
        print("tcprc ctl: device add: %s" % exc, file=sys.stderr)
        return EXIT_ERROR
    print("wrote %s (mode 0600); the server reads it within seconds (or at once on SIGHUP)"
          % path)
    for line in device_instructions(args.command[2], secret, cfg.server.listen):
        print(line)
    return EXIT_OK


def ctl_main(args: argparse.Namespace) -> int:
    """`tcprc ctl`: 0 on OK, 1 on ERROR, 2 when no agent answers."""
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
