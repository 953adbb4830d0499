"""Test helpers by job: import them from support.<module>, never from conftest.

The socket, waiting and /proc helpers are scripts/benchkit's (one copy for the
bench and the tests), so scripts/ joins sys.path here.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SCRIPTS = os.path.join(ROOT, "scripts")
if _SCRIPTS not in sys.path:
    sys.path.insert(0, _SCRIPTS)
