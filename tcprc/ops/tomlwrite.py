"""A small TOML writer for the value types of the config schema.

Handles what tcprc configs hold: tables of str, int, float, bool and lists of
those, and sub-tables ([server.devices.ID]). `update_text` edits an existing file in place so that comments and
layout survive `config save`; `atomic_write` replaces the file safely.
"""

import math
import os
import re
from typing import Any, Dict, List, Optional, Tuple

from .tomlread import tomllib
# remove_stale_temps is used from here by name (tests, older callers)
from .savetemps import TEMP_SUFFIX, remove_stale_temps, temp_prefix as _temp_prefix  # noqa: F401

_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n",
            "\f": "\\f", "\r": "\\r"}


def format_key(key: str) -> str:
    if _BARE_KEY.match(key):
        return key
    return format_value(key)


def _format_str(text: str) -> str:
    out = []
    for char in text:
        if char in _ESCAPES:
            out.append(_ESCAPES[char])
        elif ord(char) < 0x20 or ord(char) == 0x7F:
            # TOML forbids raw control characters in basic strings.
            out.append("\\u%04X" % ord(char))
        else:
            out.append(char)
    return '"' + "".join(out) + '"'


def _format_float(value: float) -> str:
    if math.isnan(value):
        return "nan"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    text = repr(value)
    # repr gives "1e+16" or "1.5": both valid TOML; a bare "5" is not a float.
    if "." not in text and "e" not in text:
        text += ".0"
    return text


def format_value(value: Any) -> str:
    """One TOML value; TypeError for anything the schema cannot hold."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _format_float(value)
    if isinstance(value, str):
        return _format_str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_value(item) for item in value) + "]"
    raise TypeError("cannot write %s as a TOML value" % type(value).__name__)


def _dump_tables(path: List[str], table: Dict[str, Any], parts: List[str]) -> None:
    """[path] with its values, then its sub-tables as [path.sub] ([server.devices.gw1])."""
    lines = ["[%s]" % ".".join(format_key(name) for name in path)]
    for key, value in table.items():
        if not isinstance(value, dict):
            lines.append("%s = %s" % (format_key(key), format_value(value)))
    parts.append("\n".join(lines) + "\n")
    for key, value in table.items():
        if isinstance(value, dict):
            _dump_tables(path + [key], value, parts)


def dumps(doc: Dict[str, Any]) -> str:
    """A document of top-level scalars followed by its tables (nested ones too)."""
    head: List[str] = []
    tables: List[str] = []
    for key, value in doc.items():
        if isinstance(value, dict):
            _dump_tables([key], value, tables)
        else:
            head.append("%s = %s\n" % (format_key(key), format_value(value)))
    parts = ["".join(head)] if head else []
    parts.extend(tables)
    return "\n".join(parts)


_PART = r"(?:[A-Za-z0-9_-]+|\"[^\"]*\"|'[^']*')"
_HEADER = re.compile(r"^\s*\[\s*(%s(?:\s*\.\s*%s)*)\s*\]\s*(#.*)?$" % (_PART, _PART))


def _header_path(text: str) -> Tuple[str, ...]:
    """The names of a table header: 'server.devices."gw.1"' -> ("server", "devices", "gw.1")."""
    return tuple(part.strip("\"'") for part in re.findall(_PART, text))


def _key_line(key: str) -> "re.Pattern[str]":
    return re.compile(r"^(\s*)(?:%s|\"%s\"|'%s')\s*=" % ((re.escape(key),) * 3))


def update_text(text: str, changes: Dict[Tuple[str, str], Any]) -> str:
    """Set `changes` {(table, key): value} in the TOML `text`, keeping the rest.

    Replaces single-line assignments in place and appends missing keys to
    their table. The caller must check the result parses to what it expects
    (a value spread over several lines is not recognised) and fall back to
    `dumps` if not.
    """
    lines = text.splitlines()
    pending = dict(changes)
    # The table a line is in, by its header's names: [server.devices.gw1]
    # is not [server], so a key there is never taken for one of [server].
    table: Tuple[str, ...] = ()
    last_line_of: Dict[Tuple[str, ...], int] = {(): -1}
    for index, line in enumerate(lines):
        header = _HEADER.match(line)
        if header:
            table = _header_path(header.group(1))
            last_line_of[table] = index
            continue
        if line.strip() and not line.lstrip().startswith("#"):
            last_line_of[table] = index
        for (name, key), value in list(pending.items()):
            if (name,) != table:
                continue
            match = _key_line(key).match(line)
            if match:
                lines[index] = "%s%s = %s" % (match.group(1), format_key(key), format_value(value))
                del pending[(name, key)]
    # Insert from the bottom up so earlier indexes stay valid.
    inserts: Dict[int, List[str]] = {}
    appended: Dict[str, List[str]] = {}
    for (name, key), value in pending.items():
        assignment = "%s = %s" % (format_key(key), format_value(value))
        if (name,) in last_line_of:
            inserts.setdefault(last_line_of[(name,)], []).append(assignment)
        else:
            appended.setdefault(name, []).append(assignment)
    for index in sorted(inserts, reverse=True):
        lines[index + 1:index + 1] = inserts[index]
    for name, assignments in appended.items():
        if lines and lines[-1].strip():
            lines.append("")
        lines.append("[%s]" % format_key(name))
        lines.extend(assignments)
    return "\n".join(lines) + "\n"


def render(old_text: Optional[str], doc: Dict[str, Dict[str, Any]],
           changes: Dict[Tuple[str, str], Any]) -> str:
    """Text for `doc`: `old_text` edited in place when that gives exactly `doc`."""
    if old_text is not None:
        candidate = update_text(old_text, changes)
        try:
            if tomllib.loads(candidate) == doc:
                return candidate
        except tomllib.TOMLDecodeError:
            pass
    text = dumps(doc)
    if tomllib.loads(text) != doc:  # pragma: no cover - a writer bug, not user input
        raise ValueError("TOML writer produced a document that does not read back")
    return text


def atomic_write(path: str, text: str, mode: int = 0o600) -> None:
    """Replace `path` by `text`: temp file beside it, fsync, rename, fsync dir.

    A symlinked path keeps its link and replaces the file it points to; an
    existing file keeps its permission bits.
    """
    target = os.path.realpath(path)
    directory = os.path.dirname(target)
    try:
        mode = os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        pass
    import tempfile   # here, not at start: it pulls in shutil, random, bz2, lzma
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target), suffix=TEMP_SUFFIX, dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
