"""`tcprc device|server` read without argparse (cli.parse_agent_args).

An agent started by its init script never imports argparse nor builds the
parser (about 1 MB of an idle device, docs/benchmarks.md).  What it reads
must be exactly what argparse reads; anything it is not sure of (--help, an
error, an abbreviation, -cFILE, a value starting with "-") goes to argparse,
so every message stays argparse's own.
"""

import contextlib
import io
import os
import random
import socket
import sys

import pytest

from support.agents import run_tcprc
from support.gateway import Gateway
from support.net import free_port, listening, recv_exactly
from support.waiting import wait_for
from tcprc.cli import _AGENT_FLAGS, build_parser, parse_agent_args, refuse_extra_arguments


def argparse_reading(argv):
    """What main() did before parse_agent_args: (namespace as a dict, or None), exit
    status, stdout, stderr."""
    parser = build_parser()
    out, err = io.StringIO(), io.StringIO()
    status = 0
    values = None
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            args, extras = parser.parse_known_args(argv)
            if extras:
                refuse_extra_arguments(parser, args, extras)
            values = {k: v for k, v in vars(args).items() if k != "func"}
        except SystemExit as exc:
            status = exc.code
    return values, status, out.getvalue(), err.getvalue()


def kind_of(action):
    if action.option_strings and action.nargs == 0:
        return "flag" if action.const is True else "other"
    if type(action).__name__ == "_AppendAction":
        return "append"
    return tuple(action.choices) if action.choices else "value"


@pytest.mark.parametrize("role", ["device", "server"])
def test_the_table_has_every_flag_of_the_subcommand_with_its_dest_and_kind(role):
    sub = build_parser().subcommands[role]
    defined = {(tuple(a.option_strings), a.dest, kind_of(a))
               for a in sub._actions if a.dest != "help"}
    assert set(_AGENT_FLAGS[role]) == defined
    # No flag takes anything but a plain string: a type= or a default would
    # be argparse's to apply, and the table does not.
    for action in sub._actions:
        if action.dest != "help":
            assert action.type is None and action.default in (None, False), action


ACCEPTED = [
    ["device"],
    ["server"],
    ["device", "-c", "/etc/tcprc/tcprc.toml", "--daemon", "--pidfile", "/var/run/tcprc.pid"],
    ["device", "-c", "/etc/tcprc/tcprc.toml", "--daemon", "--pidfile", "/var/run/tcprc.pid",
     "--server", "vpn.example.net:9000", "--local", "127.0.0.1:22"],
    ["device", "--config=/x.toml", "--server=a:1", "--server", "b:2", "--server=c:3=d"],
    ["device", "--id", "gw-7", "--secret-file", "rel/secret", "--protocol", "legacy"],
    ["device", "--protocol=v2", "--protocol", "auto", "--console", "/dev/ttyS0"],
    ["device", "-c", "a.toml", "-c", "b.toml", "--daemon", "--daemon"],
    ["device", "--local", "[::1]:22", "--id", "with space", "--pidfile", "p=q"],
    ["device", "--server", "device", "--local", "server"],
    ["server", "-c", "/etc/tcprc/tcprc-server.toml", "--listen", "0.0.0.0:9000",
     "--host=0.0.0.0:2222", "--daemon", "--pidfile", "/run/s.pid"],
    ["server", "--listen", ":9000", "--host", "h\u00e9te:1"],
]


@pytest.mark.parametrize("argv", ACCEPTED, ids=" ".join)
def test_what_it_reads_is_what_argparse_reads(argv):
    ours = parse_agent_args(argv)
    assert ours is not None, argv
    values, status, _, err = argparse_reading(argv)
    assert status == 0, err
    assert vars(ours) == values


LEFT_TO_ARGPARSE = [
    [], ["--help"], ["-h"], ["--version"], ["ctl", "status"], ["demo"],
    ["device", "--help"], ["device", "-h"], ["server", "--help"],
    ["device", "--server"],                         # a value missing
    ["device", "--protocol", "v3"],                 # not a choice
    ["device", "--protocol=v3"],
    ["device", "--listen", "a:1"],                  # the other role's flag
    ["server", "--local", "a:1"],
    ["device", "--sever", "a:1"], ["server", "--lisen=a:1"],   # mistyped
    ["device", "--serv", "a:1"], ["server", "--li", "a:1"],    # abbreviations
    ["device", "--se", "a:1"],                      # an ambiguous abbreviation
    ["device", "-cFILE"], ["device", "-c=FILE"],    # short flag and value in one word
    ["device", "--server", "-1"], ["device", "--id", "-x"], ["device", "-c", "-"],
    ["device", "--server", "--local", "a:1"],
    ["device", "--id", ""], ["device", "--id="],   # empty values
    ["device", "--daemon=yes"],                     # a flag given a value
    ["server", "stray"], ["server", "--", "-c", "x"],
    ["device", "--config", "a", "extra"],
]


@pytest.mark.parametrize("argv", LEFT_TO_ARGPARSE, ids=lambda argv: " ".join(argv) or "(none)")
def test_what_it_is_not_sure_of_is_left_to_argparse(argv):
    assert parse_agent_args(argv) is None


# --help, the errors and the rest reach argparse in a real process, with the
# output and the exit status they had before parse_agent_args existed.
@pytest.mark.e2e
@pytest.mark.parametrize("argv", [
    ["device", "--help"], ["server", "-h"], ["device", "--protocol", "v3"], ["device", "--server"],
    ["device", "--se", "a:1"], ["device", "--daemon=yes"], ["server", "stray"], ["device", "-c"],
    ["server", "--lisen=a:1"], ["device", "--listen", "a:1"],
], ids=" ".join)
def test_help_and_errors_are_argparses_own(argv):
    os.environ["COLUMNS"] = "80"   # the help's width, here and in the process
    try:
        _, status, out, err = argparse_reading(argv)
    finally:
        del os.environ["COLUMNS"]
    result = run_tcprc(*argv, env=dict(os.environ, COLUMNS="80"))
    assert (result.returncode, result.stdout, result.stderr) == (status, out, err)
    assert status in (0, 2) and (out or err)


# Random command lines from words that come close to the edges: whatever
# parse_agent_args reads, argparse reads the same way.
WORDS = [
    "-c", "--config", "--server", "--local", "--id", "--secret-file", "--protocol", "--console",
    "--daemon", "--pidfile", "--listen", "--host", "--serv", "--se", "-h", "--help", "--", "-",
    "--server=a:1", "--config=", "--daemon=1", "-cX", "-c=X", "--id=-1",
    "a:1", "b", "v2", "legacy", "auto", "v3", "-1", "", "x=y", "device", "server", " ",
]


@pytest.mark.parametrize("seed", range(4))
def test_random_command_lines_are_read_as_argparse_reads_them_or_left_to_it(seed):
    rng = random.Random(seed)
    read = 0
    for _ in range(100):
        argv = [rng.choice(["device", "server"])] + rng.choices(WORDS, k=rng.randint(0, 7))
        ours = parse_agent_args(argv)
        if ours is None:
            continue
        values, status, _, err = argparse_reading(argv)
        assert status == 0, (argv, err)
        assert vars(ours) == values, argv
        read += 1
    assert read, "no command line was read without argparse: the words miss the point"


# The wrapper an init script runs as TCPRC_DAEMON: tcprc's own entry point, and
# at the agent's exit the names of every module it imported, into a file.
MODULES_WRAPPER = """import atexit, sys
compiled = []   # what the agent compile()s other than namedtuple's __new__: typing's ForwardRefs
sys.addaudithook(lambda event, args: event == "compile" and args[1] == "<string>"
                 and not str(args[0]).lstrip("b'").startswith(("lambda _cls", "def __new__(_cls"))
                 and compiled.append("_".join(str(args[0]).split())))
def _modules():
    with open(%r, "w") as f:
        f.write("\\n".join(sorted(sys.modules) + ["compiled:" + c for c in compiled]))
atexit.register(_modules)
from tcprc.cli import main
sys.argv[0] = "tcprc"
sys.exit(main())
"""


@pytest.mark.e2e
def test_a_device_started_by_its_init_script_never_imports_argparse(tmp_path, request, agents, service):
    listen, host = free_port(), free_port()
    agents.start("server", "--listen", "127.0.0.1:%d" % listen, "--host", "127.0.0.1:%d" % host)
    wait_for(lambda: listening(listen), what="server up")
    gw = Gateway(tmp_path)   # its files do not clash with the agents fixture's
    request.addfinalizer(gw.cleanup)
    modules = tmp_path / "modules.txt"
    wrapper = tmp_path / "tcprc-modules.py"
    wrapper.write_text(MODULES_WRAPPER % str(modules))
    daemon = gw._script("tcprc-wrapped", 'exec "%s" "%s" "$@"' % (sys.executable, wrapper))
    gw.defaults.write_text(gw.defaults.read_text() + "TCPRC_DAEMON=%s\n" % daemon)
    opts = "--server 127.0.0.1:%d --local %s:%d" % ((listen,) + service.address)
    res = gw.init("start", env={"TCPRC_OPTS": opts})
    assert res.returncode == 0, res.stdout + gw.log_text()
    pid = gw.pid()
    with open("/proc/%d/cmdline" % pid, "rb") as handle:   # as the init script started it
        argv = handle.read().split(b"\0")
    assert [b"device", b"-c", str(gw.conf).encode(), b"--daemon", b"--pidfile"] == argv[2:7], argv
    wait_for(lambda: listening(host), what="the device's session")
    with socket.create_connection(("127.0.0.1", host), timeout=10) as conn:
        conn.sendall(b"no argparse")
        assert recv_exactly(conn, 11) == b"no argparse"
    assert gw.init("stop").returncode == 0
    wait_for(lambda: modules.exists() and modules.read_text(), what="the agent's module list")
    names = set(modules.read_text().split())
    assert {"tcprc.cli", "tcprc.device.app"} <= names, sorted(names)
    assert "argparse" not in names
    # What an idle agent never needs (docs/benchmarks.md, third round): the control
    # socket's commands until a command line arrives, the config writer until a save,
    # the reload's diff until a SIGHUP; the server's side of the protocol; SHA-256
    # (an extension module) without an id.
    assert not {"shlex", "tcprc.ops.commands", "tcprc.ops.changes", "tcprc.ops.tomlwrite",
                "tcprc.wire.server_session", "tcprc.wire.server_handshake", "_sha256"} & names
    # nor the AST types a first compile() builds (tomllib's ForwardRefs, ops.config)
    assert not [name for name in names if name.startswith("compiled:")], sorted(names)
