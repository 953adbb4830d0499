"""[server] devices_dir: one ID.toml file per device (ops.devadd writes them).

A file holds what a [server.devices.ID] table holds (host, secret or
secret_file, ...; a relative secret_file is relative to the directory); its
name is the id.  It must be a regular file (a symlink to one is fine): a FIFO
or a link to a device is one line and skipped, never waited on.  DeviceFiles.scan() stats every file (mtime, size, inode) and
parses only those that changed, so the periodic scan costs a stat per
device.  A broken file is one log line (once per change of the file) and is
skipped; the others keep working.
"""

import logging
import os
from typing import Callable, Dict, Optional, Tuple

from ..errors import ConfigError
from ..settings import DeviceEntry
from .config import (SectionProblem, _device_entry, _device_id, device_files_beside,
                     read_toml_file)
from .files import FileProblem, readable_by_others, unprotected

log = logging.getLogger("tcprc.server")

SUFFIX = ".toml"
MAX_FILE = 65536      # bytes: a device file is a few lines
MAX_FILES = 100000    # files looked at in one scan; the rest are named in one line

Signature = Tuple[int, int, int]


class DeviceFiles:
    """The device files of one directory, as last read."""

    def __init__(self, path: str, allow_readable: Callable[[], bool] = lambda: False):
        """`allow_readable()`: the server's allow_readable_secrets now (it may be
        reloaded while this reader lives)."""
        self.path = path
        self._allow_readable = allow_readable
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
            return read_device_file(name[:-len(SUFFIX)], full, self._allow_readable())
        except ConfigError as exc:
            log.warning("%s; skipped", exc)
            return None


def read_device_file(ident: str, full: str, allow_readable: bool = False) -> DeviceEntry:
    """One device file; ConfigError (one line, no secret in it) if it is unusable.
    Read through ops.files: a FIFO or a link to a device node is refused at once,
    never waited on (the scan runs on the server's acceptor thread)."""
    problem = _device_id(False)(ident)
    if problem:
        raise ConfigError("%s: the file name is the device id, which %s" % (full, problem))
    try:
        table, content = read_toml_file(full, MAX_FILE)
    except FileProblem as exc:
        if exc.problem.startswith("longer than"):
            raise ConfigError("%s: not a device file" % exc) from None
        raise
    if readable_by_others(full, content.mode) and not allow_readable:
        found = [key for key in ("secret", "previous_secret") if table.get(key)]
        if found:
            raise ConfigError(unprotected(full, "an inline secret (%s)" % found[0], "server"))
    table = device_files_beside(table, os.path.dirname(full))
    try:
        return _device_entry(ident, table, allow_readable)
    except SectionProblem as exc:
        where = "[%s] " % exc.table if ".services." in exc.table else ""   # which service
        raise ConfigError("%s: %s%s" % (full, where, exc)) from None
