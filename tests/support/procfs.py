"""RSS, threads and descriptors of a process, from /proc (the bench's own reader)."""

from benchkit.procfs import open_fds, pipes, rss_kb, sample, threads

__all__ = ["open_fds", "pipes", "rss_kb", "sample", "threads"]
