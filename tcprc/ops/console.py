"""Serial console: a technician's terminal on a serial port, fed to CommandParser.

pyserial is optional; `serial_available()` tells, and SerialConsole is only
built when it is there. The port may be a device path or any pyserial URL.
The console thread survives the port disappearing (USB serial unplugged): it
closes it, waits with a growing delay and opens it again; the tunnel never
notices.
"""

import logging
import threading
from typing import Any, List, Optional, Tuple

from .commands import MAX_LINE

try:
    import serial
except ImportError:  # pragma: no cover - depends on the installation
    serial = None

log = logging.getLogger("tcprc.console")

INSTALL_HINT = "the serial console needs pyserial: pip install 'tcprc[serial]'"

CR, LF, BS, DEL, ESC = 0x0D, 0x0A, 0x08, 0x7F, 0x1B
CTRL_C, CTRL_U = 0x03, 0x15


def serial_available() -> bool:
    return serial is not None


class LineEditor:
    """Turns raw terminal bytes into command lines, with echo.

    CR, LF and CRLF end a line; backspace and DEL erase one character (a whole
    UTF-8 sequence); Ctrl-U erases the line; Ctrl-C abandons it; ANSI escape
    sequences (arrow keys) are ignored. A control byte (CR, Ctrl-C, BS, DEL,
    another ESC...) or a non-ASCII byte cuts an unfinished escape sequence
    short and then counts as typed, and a sequence ends after MAX_ESCAPE
    bytes: a stray ESC or a mangled key never swallows the Enter after it.
    A line longer than `max_line` bytes is dropped as it arrives, so memory
    stays bounded, and reported at its end.
    """

    MAX_ESCAPE = 16       # bytes, ESC included; real keys send at most about 8
    TOO_LONG = object()   # returned in place of a line that was over the cap
    CANCELLED = object()  # Ctrl-C: nothing to run, but a fresh prompt

    def __init__(self, max_line: int = MAX_LINE, echo: bool = True):
        self.max_line = max_line
        self.echo = echo
        self._buf = bytearray()
        self._too_long = False
        self._after_cr = False
        self._escape = 0          # 0: none, 1: after ESC, 2: inside CSI/SS3
        self._escape_len = 0

    def feed(self, data: bytes) -> Tuple[bytes, List[Any]]:
        """Returns (bytes to echo, completed lines: str, TOO_LONG or CANCELLED)."""
        out = bytearray()
        lines: List[Any] = []
        for byte in data:
            after_cr, self._after_cr = self._after_cr, False
            if self._escape:
                if 0x20 <= byte < DEL:
                    self._skip_escape(byte)
                    continue
                self._escape = 0   # no escape sequence holds this byte: it was typed
            if byte in (CR, LF):
                if byte == LF and after_cr:
                    continue      # the LF of a CRLF
                self._after_cr = byte == CR
                lines.append(self._finish())
                out += b"\r\n"
            elif byte in (BS, DEL):
                if self._buf and not self._too_long:
                    self._erase_char()
                    out += b"\b \b"
            elif byte == CTRL_U:
                while self._buf and not self._too_long:
                    self._erase_char()
                    out += b"\b \b"
            elif byte == CTRL_C:
                self._buf = bytearray()
                self._too_long = False
                lines.append(self.CANCELLED)
                out += b"^C\r\n"
            elif byte == ESC:
                self._escape, self._escape_len = 1, 1
            elif byte < 0x20:
                byte = 0x20 if byte == 0x09 else -1   # tab types a space, the rest is noise
                if byte > 0:
                    self._add(byte, out)
            else:
                self._add(byte, out)
        return (bytes(out) if self.echo else b""), lines

    def _add(self, byte: int, out: bytearray) -> None:
        if self._too_long:
            return
        if len(self._buf) >= self.max_line:
            self._too_long = True
            self._buf = bytearray()   # give the memory back now, not at the line end
            return
        self._buf.append(byte)
        out.append(byte)

    def _erase_char(self) -> None:
        # Drop UTF-8 continuation bytes, then the lead byte.
        while self._buf and 0x80 <= self._buf[-1] < 0xC0:
            self._buf.pop()
        if self._buf:
            self._buf.pop()

    def _skip_escape(self, byte: int) -> None:
        self._escape_len += 1
        if self._escape == 1:
            self._escape = 2 if byte in (ord("["), ord("O")) else 0
        elif 0x40 <= byte <= 0x7E or self._escape_len >= self.MAX_ESCAPE:
            self._escape = 0

    def _finish(self) -> Any:
        line, too_long = self._buf, self._too_long
        self._buf, self._too_long = bytearray(), False
        if too_long:
            return self.TOO_LONG
        return line.decode("utf-8", errors="replace")

    def pending(self) -> int:
        return len(self._buf)


class SerialConsole:
    """A thread serving CommandParser on one serial port, reopening it when lost.

    start() and close() are called from the main thread; only the console's
    own thread touches the port and calls parser.execute().
    """

    READ_TIMEOUT = 0.2       # how quickly close() is noticed
    WRITE_TIMEOUT = 2.0      # a port nobody reads (flow control) cannot block us

    def __init__(self, parser: Any, port: str, baudrate: int = 115200, echo: bool = True,
                 prompt: str = "tcprc> ", retry_min: float = 0.5, retry_max: float = 5.0,
                 max_line: int = MAX_LINE):
        if serial is None:
            raise RuntimeError(INSTALL_HINT)
        self.parser = parser
        self.port = port
        self.baudrate = baudrate
        self.echo = echo
        self.prompt = prompt.encode("utf-8")
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.max_line = max_line
        self.open_attempts = 0     # seen by tests: a lost port must not busy-loop
        self.opened = 0            # how many times the port was opened
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="tcprc-console", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        delay = self.retry_min
        last_problem = None
        while not self._stop.is_set():
            self.open_attempts += 1
            try:
                port = serial.serial_for_url(self.port, baudrate=self.baudrate,
                                             timeout=self.READ_TIMEOUT,
                                             write_timeout=self.WRITE_TIMEOUT)
            except (serial.SerialException, OSError, ValueError) as exc:
                problem = str(exc)
                if problem != last_problem:   # one line per outage, not one per retry
                    log.warning("console %s unavailable: %s; retrying", self.port, problem)
                    last_problem = problem
                self._stop.wait(delay)
                delay = min(delay * 2, self.retry_max)
                continue
            self.opened += 1
            log.info("console on %s%s", self.port,
                     " (back)" if last_problem is not None else "")
            last_problem, delay = None, self.retry_min
            try:
                self._serve(port)
            except (serial.SerialException, OSError) as exc:
                last_problem = str(exc)
                log.warning("console %s lost: %s; retrying", self.port, exc)
                self._stop.wait(delay)
            except Exception as exc:   # the fault barrier: the port is opened afresh
                last_problem = "internal error"
                log.error("internal error in the console on %s (it is opened again): %s: %s",
                          self.port, type(exc).__name__, exc, exc_info=exc)
                self._stop.wait(self.retry_max)
            finally:
                try:
                    port.close()
                except (serial.SerialException, OSError):
                    pass

    def _serve(self, port: Any) -> None:
        editor = LineEditor(self.max_line, self.echo)
        self._write(port, self.prompt)
        while not self._stop.is_set():
            data = port.read(max(1, port.in_waiting))
            if not data:
                continue
            echo, lines = editor.feed(data)
            out = bytearray(echo)
            for line in lines:
                if line is LineEditor.TOO_LONG:
                    answer = ["ERROR line too long (max %d bytes)" % self.max_line]
                elif line is LineEditor.CANCELLED:
                    answer = []
                else:
                    answer = self.parser.execute(line)
                for text in answer:
                    out += text.encode("utf-8") + b"\r\n"
                out += self.prompt
            self._write(port, bytes(out))

    def _write(self, port: Any, data: bytes) -> None:
        if not data:
            return
        try:
            port.write(data)
        except serial.SerialTimeoutException:
            log.debug("console %s: output dropped, nobody reads the port", self.port)
