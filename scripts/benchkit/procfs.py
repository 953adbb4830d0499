"""Process figures from /proc: RSS, threads, CPU, descriptors (shared by bench and tests)."""

import os
from typing import Dict, List

_CLK = os.sysconf("SC_CLK_TCK")


def stat_fields(pid: int) -> List[str]:
    """/proc/PID/stat from field 3 (state) on: the name in parentheses may hold spaces."""
    with open("/proc/%d/stat" % pid) as f:
        data = f.read()
    return data[data.rindex(")") + 2:].split()


def rss_kb(pid: int) -> int:
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS for %d" % pid)


def threads(pid: int) -> int:
    """Every thread of `pid`, native ones too (pumps are not threading.Threads)."""
    return len(os.listdir("/proc/%d/task" % pid))


def open_fds(pid: int) -> int:
    return len(os.listdir("/proc/%d/fd" % pid))


def descriptors_of_kind(pid: int, kind: str) -> int:
    """Descriptors of `pid` whose /proc link starts with `kind` ("pipe:",
    "anon_inode:[eventpoll]"); one closed between the listing and its read is skipped."""
    count = 0
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            if os.readlink("/proc/%d/fd/%s" % (pid, fd)).startswith(kind):
                count += 1
        except OSError:
            pass
    return count


def pipes(pid: int) -> int:
    return descriptors_of_kind(pid, "pipe:")


def process_tree(root: int) -> List[int]:
    """`root` and every live descendant (socat forks per connection, sshd per login)."""
    children: Dict[int, List[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                ppid = int(stat_fields(int(name))[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def sample(root: int) -> Dict[str, float]:
    """RSS (KB), threads and CPU seconds of a process tree.

    CPU counts live processes plus the children the root already reaped, so
    every CPU second is counted once.  RSS is summed over processes.
    """
    rss = nthreads = 0
    cpu = 0.0
    for pid in process_tree(root):
        try:
            fields = stat_fields(pid)
            with open("/proc/%d/status" % pid) as f:
                status = f.read()
        except OSError:
            continue
        ticks = int(fields[11]) + int(fields[12])
        if pid == root:
            ticks += int(fields[13]) + int(fields[14])
        cpu += ticks / _CLK
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1])
            elif line.startswith("Threads:"):
                nthreads += int(line.split()[1])
    return {"rss_kb": rss, "threads": nthreads, "cpu_s": cpu}
