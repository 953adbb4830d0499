"""Pump threads on their own: bounded joins, errors reported, little allocation, OS threads."""

import os
import sys
import textwrap
import threading

import pytest

from support.fresh import python_output
from support.waiting import wait_for
from tcprc.engine import pump


# ---- pump threads -------------------------------------------------------------------
def test_pump_thread_joins_with_a_bound_and_reports_its_end():
    release = threading.Event()
    thread = pump.PumpThread("tcprc-pump-test", release.wait, (10,))
    assert thread.is_alive()
    assert thread.join(0.05) is False
    release.set()
    assert thread.join(5) is True
    assert not thread.is_alive()


def test_an_error_escaping_a_pump_reaches_threading_excepthook(monkeypatch):
    seen = []
    monkeypatch.setattr(threading, "excepthook",
                        lambda args: seen.append((args.exc_type, str(args.exc_value), args.thread.name)))

    def broken():
        raise RuntimeError("boom")

    thread = pump.PumpThread("tcprc-pump-7", broken, ())
    assert thread.join(5)
    assert seen == [(RuntimeError, "boom", "tcprc-pump-7")]


def _traced_bytes_in_a_fresh_process(script):
    """What `script` prints: bytes it traced with tracemalloc, in a process of its
    own.  tracemalloc counts every thread's allocations, and in the test process
    daemon threads of earlier tests may still allocate (CI's 3.8 run once measured
    1504 B per pump thread where a process of its own measures 629)."""
    prelude = "import sys, threading, tracemalloc\nfrom tcprc.engine import pump\n"
    return float(python_output(prelude + textwrap.dedent(script)))


@pytest.mark.memory
def test_a_running_pump_thread_allocates_little():
    # threading.Thread allocates about 3 KB of objects per running thread
    # (traced here); a pump thread must stay well under half of that.
    per_thread = _traced_bytes_in_a_fresh_process("""
        gate = threading.Event()
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        threads = [pump.PumpThread("p%d" % n, gate.wait, (10,)) for n in range(50)]
        per_thread = (tracemalloc.get_traced_memory()[0] - base) / 50.0
        gate.set()
        tracemalloc.stop()
        assert all(t.join(5) for t in threads)
        print(per_thread)
        """)
    assert per_thread < 1500, "%.0f bytes per pump thread" % per_thread


@pytest.mark.memory
def test_a_stream_that_never_queues_allocates_no_queue():
    # Most streams never hold bytes back from their socket; a deque would
    # cost each of them a 528-byte block (with one, a Stream traced 1178 B).
    per_stream = _traced_bytes_in_a_fresh_process("""
        tracemalloc.start()
        base = tracemalloc.get_traced_memory()[0]
        streams = [pump.Stream(n % 256, "127.0.0.1:%d" % (10000 + n)) for n in range(200)]
        print((tracemalloc.get_traced_memory()[0] - base) / 200.0)
        """)
    # 3.11: about 560 B; up to 3.10 an instance's attribute dict is larger
    # (about 730 B).  With a deque, either would be over 1000.
    limit = 700 if sys.version_info >= (3, 11) else 900
    assert per_stream < limit, "%.0f bytes per idle Stream" % per_stream
    stream = pump.Stream(1, "127.0.0.1:10001")
    stream.queue(memoryview(b"abc"))
    assert stream.pending and stream.pending_bytes == 3
    stream.drop_pending()
    assert not stream.pending and stream.pending_bytes == 0


@pytest.mark.memory
def test_pump_threads_are_os_threads_that_end():
    gate, tids, lock = threading.Event(), [], threading.Lock()

    def body():
        with lock:
            tids.append(threading.get_native_id())
        gate.wait(10)

    threads = [pump.PumpThread("p%d" % n, body, ()) for n in range(20)]
    wait_for(lambda: len(tids) == 20, what="20 pump threads running")
    assert all(os.path.exists("/proc/self/task/%d" % tid) for tid in tids)
    gate.set()
    assert all(t.join(5) for t in threads)
    wait_for(lambda: not any(os.path.exists("/proc/self/task/%d" % tid) for tid in tids),
             what="the 20 threads to end")
