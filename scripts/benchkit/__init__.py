"""The parts of scripts/bench, importable (the tests share netutil and procfs)."""
