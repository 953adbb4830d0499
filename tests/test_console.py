"""The serial console: line editing, then a technician typing on a real pty."""

import logging
import os
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

from support import ROOT
from support.agents import tcprc_command
from support.services import Service
from support.waiting import wait_for
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import build_config
from tcprc.ops.console import LineEditor, SerialConsole, serial_available
from tcprc.device.app import DeviceApp
from tcprc.server.app import ServerApp

needs_serial = pytest.mark.skipif(
    not serial_available(), reason="pyserial is not installed: pip install 'tcprc[serial]'")


# -- LineEditor: pure byte handling ------------------------------------------

@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"])
def test_each_line_ending_gives_exactly_one_line(ending):
    editor = LineEditor()
    echo, lines = editor.feed(b"status" + ending + b"help" + ending)
    assert lines == ["status", "help"]
    assert echo == b"status\r\nhelp\r\n"


def test_crlf_split_across_reads_is_one_line_end():
    editor = LineEditor()
    assert editor.feed(b"status\r")[1] == ["status"]
    assert editor.feed(b"\n")[1] == []          # the LF of the CRLF, not a blank line
    assert editor.feed(b"\n")[1] == [""]        # a second LF is a real (blank) line


def test_backspace_and_delete_erase_one_character():
    editor = LineEditor()
    echo, lines = editor.feed(b"statx\x7fuz\x08s\r")
    assert lines == ["status"]
    assert echo == b"statx\b \buz\b \bs\r\n"


def test_backspace_on_empty_line_does_nothing():
    editor = LineEditor()
    assert editor.feed(b"\x7f\x08") == (b"", [])


def test_backspace_erases_a_whole_utf8_character():
    editor = LineEditor()
    echo, lines = editor.feed("caf\u00e9\x7fe\r".encode("utf-8"))
    assert lines == ["cafe"]


def test_ctrl_u_erases_the_line_and_ctrl_c_abandons_it():
    editor = LineEditor()
    echo, lines = editor.feed(b"garbage\x15help\r")
    assert lines == ["help"]
    echo, lines = editor.feed(b"half typed\x03")
    assert lines == [LineEditor.CANCELLED] and echo.endswith(b"^C\r\n")
    assert editor.feed(b"status\r")[1] == ["status"]


def test_arrow_keys_and_tabs():
    editor = LineEditor()
    assert editor.feed(b"sta\x1b[A\x1b[Dtus\x1bOB\r")[1] == ["status"]
    assert editor.feed(b"help\tstatus\r")[1] == ["help status"]


@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"])
def test_escape_then_enter_ends_the_line(ending):
    editor = LineEditor()
    echo, lines = editor.feed(b"status\x1b" + ending)
    assert lines == ["status"] and echo == b"status\r\n"     # the lone ESC is dropped
    assert editor.feed(b"help\r")[1] == ["help"]


def test_enter_inside_an_unfinished_escape_sequence_ends_the_line():
    # The issue: a mangled key (F2 is ESC [ 1 2 ~) without its final byte, Enter,
    # then `status` retyped. The old editor took the CR as part of the sequence and
    # the retyped `s` as its final byte: the line ran as `statustatus`.
    editor = LineEditor()
    assert editor.feed(b"\x1b[12\rstatus\r")[1] == ["", "status"]
    # With `status` typed before the key, the Enter runs the line as shown on the
    # screen (the sequence is dropped as arrow keys are), the retyped one runs again.
    echo, lines = editor.feed(b"status\x1b[12\rstatus\r")
    assert lines == ["status", "status"]
    assert echo == b"status\r\nstatus\r\n"


@pytest.mark.parametrize("typed, expected", [
    (b"garbage\x1b[1;5\x03help\r", [LineEditor.CANCELLED, "help"]),   # Ctrl-C
    (b"garbage\x1b[1;5\x15help\r", ["help"]),                          # Ctrl-U
    (b"helpx\x1b[1;5\x08\r", ["help"]),                                 # BS
    (b"helpx\x1b[1;5\x7f\r", ["help"]),                                 # DEL
    (b"help\x1b[1;5\n", ["help"]),                                      # LF
])
def test_control_bytes_inside_an_escape_sequence_act_as_typed(typed, expected):
    assert LineEditor().feed(typed)[1] == expected


def test_a_second_escape_starts_a_new_sequence():
    editor = LineEditor()
    assert editor.feed(b"sta\x1b[1\x1b[Atus\x1b\x1bOBx\x7f\r")[1] == ["status"]


def test_non_ascii_byte_ends_an_escape_sequence():
    editor = LineEditor()
    assert editor.feed("\x1b[1caf\u00e9\r".encode("utf-8"))[1] == ["af\u00e9"]
    assert editor.feed("\x1b[1\u00e9\r".encode("utf-8"))[1] == ["\u00e9"]


def test_an_endless_escape_sequence_stops_swallowing_input():
    editor = LineEditor()
    cap = LineEditor.MAX_ESCAPE
    # ESC, '[' and parameter bytes that never reach a final byte: after `cap`
    # bytes the editor stops skipping, and what follows is typed again.
    echo, lines = editor.feed(b"\x1b[" + b"1" * (cap - 2) + b"234")
    assert echo == b"234" and lines == []
    assert editor.feed(b"\r")[1] == ["234"]
    # A sequence of exactly the cap still ends with its final byte.
    assert editor.feed(b"\x1b[" + b"1" * (cap - 3) + b"~ok\r")[1] == ["ok"]


def test_no_echo_when_disabled():
    editor = LineEditor(echo=False)
    assert editor.feed(b"status\x7fs\r") == (b"", ["status"])


def test_megabyte_line_is_dropped_with_bounded_memory():
    editor = LineEditor(max_line=4096)
    chunk = b"x" * 65536
    echoed = 0
    for _ in range(16):                          # 1 MiB without a line end
        echo, lines = editor.feed(chunk)
        echoed += len(echo)
        assert lines == []
        assert editor.pending() <= 4096
    assert echoed == 4096                        # echo stops with the line
    echo, lines = editor.feed(b"\r")
    assert lines == [LineEditor.TOO_LONG]
    assert editor.feed(b"status\r")[1] == ["status"]   # and the next line works


def test_line_at_the_cap_is_accepted():
    editor = LineEditor(max_line=10)
    assert editor.feed(b"0123456789\r")[1] == ["0123456789"]
    assert editor.feed(b"0123456789a\r")[1] == [LineEditor.TOO_LONG]


# -- a technician on a real pty ------------------------------------------------

PROMPT = b"tcprc> "


class Terminal:
    """The technician's end of a pty pair; the agent opens `path` with pyserial."""

    def __init__(self, link_path=None):
        self.master, self.slave = os.openpty()
        self.path = os.ttyname(self.slave)
        if link_path is not None:      # a stable name, like /dev/ttyUSB0 across replugs
            os.symlink(self.path, link_path)
        self.link_path = link_path
        self.buf = bytearray()

    def type(self, data):
        os.write(self.master, data)

    def expect(self, marker, timeout=5.0):
        """Everything up to and including `marker`; the rest stays buffered."""
        deadline = time.monotonic() + timeout
        while marker not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no %r on the terminal; got %r" % (marker, bytes(self.buf[-300:])))
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    self.buf += os.read(self.master, 65536)
                except OSError:        # EIO while the agent has the port closed
                    time.sleep(0.01)
        end = self.buf.index(marker) + len(marker)
        out = bytes(self.buf[:end])
        del self.buf[:end]
        return out

    def command(self, line, ending=b"\r"):
        """Type a line; the agent's answer lines (echo and prompt stripped)."""
        self.type(line.encode() + ending)
        out = self.expect(PROMPT).decode()
        lines = out[:-len(PROMPT)].split("\r\n")
        assert lines[0] == line, lines          # the echo of what was typed
        assert lines[-1] == "", lines           # the answer ends with CRLF
        return lines[1:-1]

    def unplug(self):
        os.close(self.master)
        os.close(self.slave)
        if self.link_path is not None:
            os.unlink(self.link_path)
        self.master = self.slave = -1

    def close(self):
        if self.master >= 0:
            self.unplug()


def round_trip(address, payload=b"hello through the tunnel"):
    with socket.create_connection(address, timeout=5) as client:
        client.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = client.recv(65536)
            assert chunk, "tunnel closed the client"
            got += chunk
    return got


@pytest.fixture
def bench(tmp_path):
    """A real server, an echo service, an idle device and its console on a pty."""
    things = {}
    server_cfg = build_config("server", {"server": {"listen": "127.0.0.1:0",
                                                    "host": "127.0.0.1:0"}}, "test")
    server = ServerApp(server_cfg.server)
    server.start()
    echo = Service("echo")
    cfg = build_config("device", {"device": {"reconnect_min": 0.05, "reconnect_max": 0.2}}, "test")
    device = DeviceApp(cfg.device)
    device.start()
    terminal = Terminal(str(tmp_path / "ttyTEST"))
    console = SerialConsole(CommandParser(device, cfg), terminal.link_path, baudrate=115200,
                            retry_min=0.05, retry_max=0.2)
    console.start()
    terminal.expect(PROMPT)
    things.update(server=server, echo=echo, device=device, terminal=terminal, console=console)
    yield things
    things["console"].close()      # a test may have swapped console or terminal
    things["terminal"].close()
    device.close()
    echo.close()
    server.close()


def status(terminal):
    lines = terminal.command("status")
    assert lines[-1] == "OK", lines
    return dict(line.split(": ", 1) for line in lines[:-1])


@needs_serial
@pytest.mark.parametrize("ending", [b"\r", b"\n", b"\r\n"])
def test_console_answers_each_line_ending_once(bench, ending):
    term = bench["terminal"]
    assert term.command("help", ending)[-1] == "OK"
    assert term.command("status", ending)[-1] == "OK"
    # No stray blank-line prompt from the LF of a CRLF.
    term.type(b"help\r")
    term.expect(PROMPT)
    assert bytes(term.buf) == b""


@needs_serial
def test_console_typing_byte_by_byte_with_backspace(bench):
    term = bench["terminal"]
    for byte in b"stax\x7ftuz\x08s":
        term.type(bytes([byte]))
    term.type(b"\r")
    out = term.expect(PROMPT)
    assert b"x\b \b" in out and b"z\b \b" in out
    assert b"state: idle" in out and out.endswith(b"OK\r\n" + PROMPT)


@needs_serial
def test_console_enter_after_a_mangled_key_is_not_lost(bench):
    """The issue's keystrokes, each its own write: `statustatus` ran before the fix."""
    term = bench["terminal"]
    term.type(b"\x1b[12")                                  # a mangled F2 key
    term.type(b"\r")
    assert term.expect(PROMPT) == b"\r\n" + PROMPT        # the Enter: a blank line
    term.type(b"status")
    term.type(b"\r")
    out = term.expect(PROMPT)
    assert out.startswith(b"status\r\nstate: idle\r\n") and out.endswith(b"OK\r\n" + PROMPT)
    # `status` already typed when the key came: that Enter runs it as the screen shows.
    for keys in (b"status", b"\x1b[12", b"\r"):
        term.type(keys)
    out = term.expect(PROMPT)
    assert out.startswith(b"status\r\nstate: idle\r\n") and out.endswith(b"OK\r\n" + PROMPT)
    assert term.command("status")[-1] == "OK"
    assert bytes(term.buf) == b""


@needs_serial
def test_console_escape_then_enter_runs_the_line(bench):
    term = bench["terminal"]
    term.type(b"status\x1b")
    term.type(b"\r")
    out = term.expect(PROMPT)
    assert out.startswith(b"status\r\nstate: idle\r\n") and out.endswith(b"OK\r\n" + PROMPT)


@needs_serial
def test_console_blank_line_and_errors(bench):
    term = bench["terminal"]
    term.type(b"\r")
    assert term.expect(PROMPT) == b"\r\n" + PROMPT      # just a fresh prompt
    assert term.command("reboot now") == ["ERROR unknown command 'reboot' (type help for the list)"]
    lines = term.command("TCPRemoteConnect 127.0.0.1 70000 127.0.0.1 22")
    assert len(lines) == 1 and lines[0].startswith("ERROR ServerPort")
    lines = term.command("TCPRemoteConnect 127.0.0.1 9000 127.0.0.1")
    assert len(lines) == 1 and lines[0].startswith("ERROR ") and "got 3" in lines[0]


@needs_serial
def test_console_commands_while_the_tunnel_is_down(bench):
    term = bench["terminal"]
    assert status(term)["state"] == "idle"
    lines = term.command("TCPRemoteConnect")
    assert len(lines) == 1 and lines[0].startswith("ERROR no server")
    assert term.command("TCPRemoteDisconnect") == ["OK"]
    assert term.command("config get device.server") == ['device.server = ""', "OK"]


@needs_serial
def test_console_brings_up_a_real_tunnel_and_closes_it(bench):
    term, server, echo = bench["terminal"], bench["server"], bench["echo"]
    uplink = "%s %d" % server.listen_address
    assert term.command("TCPRemoteConnect %s %s %d" % ((uplink,) + echo.address)) == ["OK"]
    wait_for(lambda: server.host_address, what="the server's host listener")
    assert round_trip(server.host_address) == b"hello through the tunnel"
    # The counters follow the bytes by a thread switch: wait for them.
    wait_for(lambda: bench["device"].status()["bytes_up"] >= 24, what="bytes counted")
    st = status(term)
    assert st["state"] == "up" and st["server"] == "%s:%d" % server.listen_address
    assert st["local"] == "%s:%d" % echo.address
    assert int(st["bytes_up"]) >= 24 and int(st["bytes_down"]) >= 24, st
    assert term.command("TCPRemoteDisconnect") == ["OK"]
    wait_for(lambda: server.host_address is None, what="host listener closed")
    wait_for(lambda: bench["device"].status()["state"] == "idle", what="device idle")
    assert status(term)["state"] == "idle"


@needs_serial
def test_console_megabyte_line_is_refused_and_the_console_lives_on(bench):
    term = bench["terminal"]
    blob = b"A" * (1 << 20)

    def write_all():
        view = memoryview(blob)
        while view:
            view = view[os.write(term.master, view[:65536]):]
    writer = threading.Thread(target=write_all, daemon=True)
    writer.start()
    echoed = 0
    deadline = time.monotonic() + 30
    while writer.is_alive() and time.monotonic() < deadline:
        ready, _, _ = select.select([term.master], [], [], 0.1)
        if ready:
            echoed += len(os.read(term.master, 65536))
    writer.join(1)
    assert not writer.is_alive()
    term.type(b"\r")
    out = term.expect(PROMPT, timeout=10)
    echoed += len(out)
    assert out.endswith(b"ERROR line too long (max 4096 bytes)\r\n" + PROMPT)
    assert echoed <= 4096 + 64           # the echo stopped at the cap as well
    assert term.command("status")[-1] == "OK"


@needs_serial
def test_console_survives_the_port_vanishing(bench, caplog, tmp_path):
    caplog.set_level(logging.INFO, logger="tcprc")
    term, server, echo, console = bench["terminal"], bench["server"], bench["echo"], bench["console"]
    uplink = "%s %d" % server.listen_address
    assert term.command("TCPRemoteConnect %s %s %d" % ((uplink,) + echo.address)) == ["OK"]
    wait_for(lambda: server.host_address, what="tunnel up")

    term.unplug()                        # the USB serial adapter is pulled
    wait_for(lambda: "lost" in caplog.text, what="the console to notice")
    attempts = console.open_attempts
    started = time.monotonic()
    # The tunnel does not care.
    assert round_trip(server.host_address, b"still here") == b"still here"
    time.sleep(1.0)                      # an outage of a second: count the retries in it
    retries = console.open_attempts - attempts
    elapsed = time.monotonic() - started
    assert 2 <= retries <= elapsed / 0.05 + 2, retries   # retrying, but never busy
    assert caplog.text.count("unavailable") == 1         # one log line per outage

    bench["terminal"] = term = Terminal(str(tmp_path / "ttyTEST"))   # plugged back in
    term.expect(PROMPT)
    st = status(term)
    assert st["state"] == "up"
    assert console.opened == 2
    assert round_trip(server.host_address, b"and back") == b"and back"


@needs_serial
def test_console_without_echo(bench):
    bench["console"].close()
    term = bench["terminal"]
    console = SerialConsole(bench["console"].parser, term.link_path, echo=False, prompt="")
    bench["console"] = console
    console.start()
    wait_for(lambda: console.opened == 1, what="port open")   # opening flushes earlier input
    term.type(b"sx\x7ftatus\r")
    out = term.expect(b"OK\r\n")
    assert out.startswith(b"state: idle\r\n")           # no echo, no prompt


@needs_serial
def test_console_close_is_prompt_even_while_waiting_for_a_port(tmp_path):
    cfg = build_config("device", {}, "test")
    device = DeviceApp(cfg.device)
    console = SerialConsole(CommandParser(device, cfg), str(tmp_path / "nothing-here"),
                            retry_min=5, retry_max=5)
    console.start()
    wait_for(lambda: console.open_attempts >= 1, what="first attempt")
    started = time.monotonic()
    console.close()
    assert time.monotonic() - started < 2
    assert not any(t.name == "tcprc-console" for t in threading.enumerate())


@pytest.mark.e2e
@needs_serial
def test_agent_process_with_console_flag(tmp_path):
    """`tcprc device --console PORT` as the init script would start it."""
    config = tmp_path / "device.toml"
    config.write_text('[control]\nsocket = ""\n[console]\nprompt = "gw17> "\n')
    term = Terminal()
    log = open(str(tmp_path / "agent.log"), "wb")
    proc = subprocess.Popen(tcprc_command("device", "-c", str(config), "--console", term.path),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log)
    try:
        term.expect(b"gw17> ", timeout=15)
        term.type(b"status\r\n")
        out = term.expect(b"gw17> ")
        assert b"state: idle\r\n" in out and out.endswith(b"OK\r\ngw17> ")
        term.type(b"config set device.autostart maybe\r")
        out = term.expect(b"gw17> ")
        assert b"ERROR device.autostart must be true or false, got 'maybe'\r\n" in out
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(15) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
            log.close()
            term.close()
    assert b"Traceback" not in (tmp_path / "agent.log").read_bytes()
