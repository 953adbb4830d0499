"""The temporary files of `config save` (ops.tomlwrite.atomic_write): their names,
and clearing those a save killed mid-write left behind.

Apart from ops.tomlwrite because every agent started with -c clears them at
start, and an agent that never saves its config need not hold the TOML
writer (docs/benchmarks.md, third round).
"""

import os
import re
import stat
import time
from typing import List, Tuple

TEMP_SUFFIX = ".tmp"
STALE_TEMP_AGE = 10.0   # seconds; a save takes milliseconds, a slow flash a second


def temp_prefix(target: str) -> str:
    return "." + os.path.basename(target) + "."


def remove_stale_temps(path: str, min_age: float = STALE_TEMP_AGE) -> Tuple[List[str], List[str]]:
    """Delete what `atomic_write(path)` left when it was killed: (removed, failures).

    Only regular files of this user named exactly as mkstemp names ours, and
    only those whose mtime is `min_age` away from now: a younger one may be a
    save under way (one far in the future means the clock was set back).
    """
    target = os.path.realpath(path)
    # mkstemp's names: the prefix, 8 characters of [a-z0-9_], the suffix.
    ours = re.compile(re.escape(temp_prefix(target)) + "[a-z0-9_]{8}"
                      + re.escape(TEMP_SUFFIX) + r"\Z")
    removed: List[str] = []
    failed: List[str] = []
    now, uid = time.time(), os.geteuid()
    try:
        entries = os.scandir(os.path.dirname(target))
    except OSError as exc:
        return removed, ["%s: %s" % (os.path.dirname(target), exc.strerror or exc)]
    with entries:
        for entry in entries:
            if not ours.match(entry.name):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
                if (not stat.S_ISREG(info.st_mode) or info.st_uid != uid
                        or abs(now - info.st_mtime) < min_age):
                    continue
                os.unlink(entry.path)
                removed.append(entry.name)
            except FileNotFoundError:
                continue
            except OSError as exc:
                failed.append("%s: %s" % (entry.name, exc.strerror or exc))
    return removed, failed
