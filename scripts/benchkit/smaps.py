"""Where a process's RSS goes: /proc/PID/smaps sorted into the parts that matter
on a small gateway (`scripts/bench --breakdown`).

Every mapping is put in exactly one part, so the parts add up to the RSS:
- the interpreter: the python executable and libpython;
- each shared library by name (libc, libm, libcrypto, libssl, ...); their pages
  are file pages, shared with every other process that maps the same file;
- extension modules (lib-dynload/*.so), together;
- thread stacks: the anonymous mapping that holds a thread's stack pointer
  (/proc/PID/task/TID/syscall; a thread asleep in a system call shows it),
  and the main thread's [stack];
- malloc's main arena ([heap], grown with brk) and its other arenas
  (anonymous mappings followed by their PROT_NONE reserve, 64 MB aligned:
  MALLOC_ARENA_MAX=1 leaves none);
- the rest of the anonymous memory: the Python heap (pymalloc's arenas, for
  objects of up to 512 bytes), tcprc's buffers (engine/buffers.py), malloc
  blocks over its mmap threshold.  The kernel merges these mappings, so the
  Python heap is not told apart here; the process's own count of its live
  objects there (sys._debugmallocstats) is reported beside it;
- other files (locale data, gconv cache) and the kernel's [vdso]/[vvar].
"""

import os
import re
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")
_ARENA_ALIGN = 64 << 20     # glibc's HEAP_MAX_SIZE on 64-bit
ANONYMOUS = "anonymous: Python heap (pymalloc), tcprc buffers, large blocks"


class Mapping(NamedTuple):
    start: int
    end: int
    perms: str
    path: str
    rss_kb: int
    private_kb: int     # Private_Clean + Private_Dirty: this process's alone


def read_smaps(pid: int) -> List[Mapping]:
    maps: List[Mapping] = []
    head: Optional[Tuple[int, int, str, str]] = None
    rss = private = 0

    def flush() -> None:
        if head is not None:
            maps.append(Mapping(head[0], head[1], head[2], head[3], rss, private))

    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            m = _HEAD.match(line)
            if m:
                flush()
                head = (int(m.group(1), 16), int(m.group(2), 16), m.group(3), m.group(4).strip())
                rss = private = 0
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
            elif line.startswith(("Private_Clean:", "Private_Dirty:")):
                private += int(line.split()[1])
    flush()
    return maps


def stack_pointers(pid: int) -> List[int]:
    """Each thread's stack pointer while it sleeps in a system call (all of an
    idle agent's threads do); a thread that is running is left out."""
    out = []
    try:
        tids = os.listdir("/proc/%d/task" % pid)
    except OSError:
        return out
    for tid in tids:
        try:
            with open("/proc/%d/task/%s/syscall" % (pid, tid)) as f:
                fields = f.read().split()
        except OSError:
            continue
        if len(fields) >= 8:
            out.append(int(fields[-2], 16))
    return out


def malloc_stats(text: str) -> Dict[str, int]:
    """From sys._debugmallocstats() output: pymalloc's arenas (bytes) and the
    bytes of live objects in them; {} when the text has none."""
    out: Dict[str, int] = {}
    arenas = re.search(r"^(\d+) arenas \* (\d+) bytes/arena\s*=\s*([\d,]+)", text, re.M)
    used = re.search(r"^# bytes in allocated blocks\s*=\s*([\d,]+)", text, re.M)
    if arenas:
        out["arenas"] = int(arenas.group(1))
        out["arena_bytes"] = int(arenas.group(3).replace(",", ""))
    if used:
        out["allocated_bytes"] = int(used.group(1).replace(",", ""))
    return out


def _library(path: str) -> str:
    """"libcrypto" for /usr/lib/x86_64-linux-gnu/libcrypto.so.3."""
    name = os.path.basename(path)
    if name.startswith("ld-linux") or name.startswith("ld-"):
        return "ld.so"
    return name.split(".so")[0]


def classify(maps: List[Mapping], stacks: List[int], python: str = "") -> Dict[str, Dict[str, Any]]:
    """Each part: {"rss_kb", "private_kb", "mappings"}; see the module docstring."""
    parts: Dict[str, Dict[str, Any]] = {}
    exe = os.path.realpath(python) if python else ""

    def add(part: str, m: Mapping) -> None:
        p = parts.setdefault(part, {"rss_kb": 0, "private_kb": 0, "mappings": 0})
        p["rss_kb"] += m.rss_kb
        p["private_kb"] += m.private_kb
        p["mappings"] += 1

    anonymous = []
    for i, m in enumerate(maps):
        path = m.path
        if path.startswith("/"):
            base = os.path.basename(path)
            if path == exe or base.startswith("python") or base.startswith("libpython"):
                add("interpreter (python, libpython)", m)
            elif "/lib-dynload/" in path or ".cpython-" in base or base.endswith(".abi3.so"):
                add("extension modules (lib-dynload)", m)
            elif ".so" in base:
                add("shared library: " + _library(path), m)
            else:
                add("other files (locale data, caches)", m)
        elif path == "[heap]":
            add("malloc main arena ([heap], brk)", m)
        elif path == "[stack]":
            add("thread stacks", m)
        elif path.startswith("["):
            add("kernel ([vdso], [vvar])", m)
        elif m.perms.startswith("---"):
            add("guard pages and reserves", m)
        elif any(m.start <= sp < m.end for sp in stacks):
            add("thread stacks", m)
        elif (i + 1 < len(maps) and maps[i + 1].start == m.end and maps[i + 1].perms.startswith("---")
              and not maps[i + 1].path and m.start % _ARENA_ALIGN == 0):
            add("malloc arenas of other threads", m)
        else:
            anonymous.append(m)
    if anonymous:
        parts[ANONYMOUS] = {"rss_kb": sum(m.rss_kb for m in anonymous),
                            "private_kb": sum(m.private_kb for m in anonymous),
                            "mappings": len(anonymous)}
    return parts


def breakdown(maps: List[Mapping], stacks: List[int], python: str = "",
              mallocstats: str = "") -> Dict[str, Any]:
    """The parts of an RSS read with read_smaps() and stack_pointers(), and their
    sum (VmRSS, read at another moment, differs by a few KB)."""
    stats = malloc_stats(mallocstats) if mallocstats else {}
    parts = classify(maps, stacks, python)
    return {"parts": parts, "total_rss_kb": sum(p["rss_kb"] for p in parts.values()),
            "total_private_kb": sum(p["private_kb"] for p in parts.values()), "pymalloc": stats}
