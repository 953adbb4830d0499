"""Python code run in an interpreter of its own: what a module imports, allocates or
opens, without what earlier tests left in the test process."""

import subprocess
import sys

from . import ROOT


def python_output(code, *args, timeout=60):
    """The stdout of `python -c code args...`, run from the checkout; a non-zero exit
    fails the test with the child's stderr."""
    out = subprocess.run([sys.executable, "-c", code] + list(args), cwd=ROOT,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr
    return out.stdout
