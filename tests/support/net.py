"""Sockets on 127.0.0.1: ports, exact reads, EOF, listeners seen in /proc."""

import resource

import pytest
from benchkit.netutil import (HostPort, free_port, is_eof, listening, port_accepts, recv_exactly,
                              recv_until_eof)

__all__ = ["HostPort", "free_port", "is_eof", "listening", "port_accepts", "recv_exactly",
           "recv_until_eof", "raise_fd_limit"]


def raise_fd_limit(need: int) -> None:
    """Raise this process's soft RLIMIT_NOFILE to `need`, or skip the test."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        if hard != resource.RLIM_INFINITY and hard < need:
            pytest.skip("needs %d file descriptors, hard limit is %d" % (need, hard))
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))
