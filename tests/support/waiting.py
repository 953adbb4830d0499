"""Waiting on a condition with a deadline: the only way tests synchronise."""

from benchkit.netutil import wait_for

__all__ = ["wait_for"]
