"""[server] devices_dir: one ID.toml file per device, and `device add` that writes one.

A file holds what a [server.devices.ID] table holds (host, secret or
secret_file; a relative secret_file is relative to the directory); its name
is the id.  DeviceFiles.scan() stats every file (mtime, size, inode) and
parses only those that changed, so the periodic scan costs a stat per
device.  A broken file is one log line (once per change of the file) and is
skipped; the others keep working.
"""

import logging
import os
from typing import Any, Dict, Optional, Tuple

from ..errors import ConfigError
from ..settings import DeviceEntry
from .config import SectionProblem, _device_entry, _device_id, _hostport
from .tomlwrite import tomllib

log = logging.getLogger("tcprc.server")

SUFFIX = ".toml"
MAX_FILE = 65536      # bytes: a device file is a few lines
MAX_FILES = 100000    # files looked at in one scan; the rest are named in one line

Signature = Tuple[int, int, int]


class DeviceFiles:
    """The device files of one directory, as last read."""

    def __init__(self, path: str):
        self.path = path
        self._files: Dict[str, Tuple[Signature, Optional[DeviceEntry]]] = {}
        self._dir_problem = ""

    def scan(self, force: bool = False) -> Optional[Dict[str, DeviceEntry]]:
        """The devices of the good files, or None when no file changed since the last
        scan (`force`: read every file again, as on SIGHUP)."""
        try:
            names = sorted(n for n in os.listdir(self.path)
                           if n.endswith(SUFFIX) and not n.startswith("."))
        except OSError as exc:
            problem = "devices_dir %s: %s" % (self.path, exc.strerror or exc)
            if problem != self._dir_problem:   # once, not every few seconds
                log.warning("%s; no device files read", problem)
                self._dir_problem = problem
            changed = bool(self._files)
            self._files = {}
            return {} if changed or force else None
        self._dir_problem = ""
        if len(names) > MAX_FILES:
            log.warning("devices_dir %s: %d files, only the first %d are read",
                        self.path, len(names), MAX_FILES)
            names = names[:MAX_FILES]
        changed = force or set(names) != set(self._files)
        files = {}
        for name in names:
            full = os.path.join(self.path, name)
            try:
                st = os.stat(full)
                sig = (st.st_mtime_ns, st.st_size, st.st_ino)
            except OSError:
                continue   # removed meanwhile
            old = self._files.get(name)
            if old is not None and old[0] == sig and not force:
                files[name] = old
                continue
            changed = True
            files[name] = (sig, self._read(name, full))
        self._files = files
        if not changed:
            return None
        return {entry.id: entry for _, entry in files.values() if entry is not None}

    def _read(self, name: str, full: str) -> Optional[DeviceEntry]:
        try:
            return read_device_file(name[:-len(SUFFIX)], full)
        except ConfigError as exc:
            log.warning("%s; skipped", exc)
            return None


def read_device_file(ident: str, full: str) -> DeviceEntry:
    """One device file; ConfigError (one line, no secret in it) if it is unusable."""
    problem = _device_id(False)(ident)
    if problem:
        raise ConfigError("%s: the file name is the device id, which %s" % (full, problem))
    try:
        with open(full, "rb") as handle:
            data = handle.read(MAX_FILE + 1)
    except OSError as exc:
        raise ConfigError("%s: %s" % (full, exc.strerror or exc)) from None
    if len(data) > MAX_FILE:
        raise ConfigError("%s: longer than %d bytes: not a device file" % (full, MAX_FILE))
    try:
        table = tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        # The parser's message names a line and column, never the text: no secret leaks.
        raise ConfigError("%s: invalid TOML: %s" % (full, exc)) from None
    secret_file = table.get("secret_file")
    if isinstance(secret_file, str) and secret_file and not os.path.isabs(secret_file):
        table["secret_file"] = os.path.join(os.path.dirname(full), secret_file)
    try:
        return _device_entry(ident, table)
    except SectionProblem as exc:
        where = "[%s] " % exc.table if ".services." in exc.table else ""   # which service
        raise ConfigError("%s: %s%s" % (full, where, exc)) from None


def add_device(directory: str, ident: str, host: str) -> Tuple[str, str]:
    """Write directory/ID.toml with a fresh secret (mode 0600, never over an existing
    file); (path, secret).  ConfigError (one line) if it cannot."""
    import secrets
    from .tomlwrite import format_value
    problem = _device_id(False)(ident)
    if problem:
        raise ConfigError("device id %s" % problem)
    problem = _hostport(False, bind=True)(host)
    if problem:
        raise ConfigError("--host %s" % problem)
    if not directory:
        raise ConfigError("[server] devices_dir is not set in the server's configuration")
    secret = secrets.token_urlsafe(32)
    path = os.path.join(directory, ident + SUFFIX)
    text = ("# device %s, written by `tcprc ctl device add`\nhost = %s\nsecret = %s\n"
            % (ident, format_value(host), format_value(secret)))
    # Written whole under a dot name (the scan skips those), 0600 from the start, then
    # linked in: the server never reads half a file, an existing device keeps its secret.
    temp = os.path.join(directory, ".%s.%d.tmp" % (ident, os.getpid()))
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.link(temp, path)
        finally:
            os.unlink(temp)
    except FileExistsError:
        raise ConfigError("%s exists already: remove it first to replace device %s"
                          % (path, ident)) from None
    except OSError as exc:
        raise ConfigError("cannot write %s: %s" % (path, exc.strerror or exc)) from None
    return path, secret


def device_instructions(ident: str, secret: str, listen: str) -> Any:
    """What the device needs, as lines to print."""
    server = listen if not listen.startswith(("0.0.0.0:", ":", "[::]:")) else \
        "SERVER-ADDRESS:" + listen.rsplit(":", 1)[1]
    return ["id: %s" % ident, "secret: %s" % secret, "server: %s" % server,
            "", "# the device's [device] section (tcprc.toml):",
            "[device]", "server = \"%s\"" % server, "id = \"%s\"" % ident,
            "secret = \"%s\"" % secret, "protocol = \"v2\""]
