"""Modules this start compiled from source because their byte-code was missing.

`python -OO` (PYTHONOPTIMIZE=2, README "Smaller still") drops docstrings and
reads `.opt-2.pyc` files.  Where there are none and none can be written (a
distribution's standard library: Debian ships plain `.pyc` only, in a
directory the agent cannot write), every start compiles those modules in
memory instead: on Debian's Python 3.11 the idle device grows by about 4 MB
and starts three times slower, the opposite of what the setting is for.
The agent says so once it runs (Service.ready), in one line.
"""

import os
import sys
from typing import Iterable, List, Optional, Tuple


def _current(source: str, cached: str) -> bool:
    """Whether `cached` holds byte-code of `source` that the import system accepts."""
    try:
        with open(cached, "rb") as f:
            head = f.read(16)
        st = os.stat(source)
    except OSError:
        return False
    if len(head) < 16:
        return False
    if int.from_bytes(head[4:8], "little") & 1:   # hash-based (PEP 552): not by date
        return True
    return (int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
            and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF)


def compiled_from_source(modules: Optional[Iterable[object]] = None) -> List[Tuple[str, str]]:
    """(source, missing byte-code file) of each module in `modules` (default: every
    imported one) that has a source file but no current byte-code for this
    interpreter's optimisation level.  Frozen, built-in and source-less modules
    have nothing to check."""
    found = []
    for module in list(sys.modules.values()) if modules is None else modules:
        source = getattr(module, "__file__", None)
        cached = getattr(module, "__cached__", None)
        if source and cached and source.endswith(".py") and not _current(source, cached):
            found.append((source, cached))
    return found


def warning_line(found: List[Tuple[str, str]]) -> str:
    """One line for the log about `found` (compiled_from_source()) under
    PYTHONOPTIMIZE, or "" (nothing found, or not optimised: a distribution's
    plain .pyc files are there)."""
    if not found or not sys.flags.optimize:
        return ""
    dirs: List[str] = []
    for source, _ in found:
        top = os.path.dirname(source)
        while os.path.exists(os.path.join(top, "__init__.py")):   # up to the package's parent
            top = os.path.dirname(top)
        if top not in dirs:
            dirs.append(top)
    level = min(sys.flags.optimize, 2)
    return ("PYTHONOPTIMIZE=%d, but %d of the modules imported had no current .opt-%d.pyc and were "
            "compiled at this start, which costs memory and time at every start (in %s): compile "
            "them once, `%s -%s -m compileall -q DIR` for each, or unset PYTHONOPTIMIZE"
            % (sys.flags.optimize, len(found), level,
               ", ".join(dirs[:3]) + (" and %d more" % (len(dirs) - 3) if len(dirs) > 3 else ""),
               sys.executable or "python3", "O" * level))
