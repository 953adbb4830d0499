"""RSS, threads and descriptors of a process, from /proc (the bench's own reader)."""

from benchkit.procfs import descriptors_of_kind, open_fds, pipes, rss_kb, sample, threads

__all__ = ["descriptors_of_kind", "open_fds", "pipes", "rss_kb", "sample", "threads"]
