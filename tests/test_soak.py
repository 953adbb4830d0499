"""scripts/soak as CI runs it (~1.5 minutes in all): a legacy and a v2 device under
random clients and faults (in the namespaces with tbf shaping where they can be
made), nothing wrong or hung, no descriptor left behind.

Not marked slow or skipped: CI's plain `python -m pytest -q` runs it.
"""

import os
import re
import subprocess
import sys

import pytest

from support import ROOT

pytestmark = [pytest.mark.faults, pytest.mark.e2e, pytest.mark.long]

MINUTES = 1.0   # plus start, the quiet end and the namespaces: about 1.5 minutes


def test_a_short_soak_verifies_streams_through_faults_and_reconnects():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak"), "--minutes", str(MINUTES),
                           "--seed", "14", "--fault-every", "5"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=400, cwd=ROOT)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout
    figures = dict((m.group(1), int(m.group(2))) for m in
                   re.finditer(r"^(streams|bytes verified|faults injected|reconnects): (\d+)", proc.stdout, re.M))
    assert figures["streams"] > 0 and figures["bytes verified"] > 0
    assert figures["faults injected"] > 0
    kinds = dict((m.group(1), (int(m.group(2)), int(m.group(3)))) for m in
                 re.finditer(r"^  (legacy|v2) +\d+ streams \((\d+) half-closes\), complete (\d+)",
                             proc.stdout, re.M))
    assert kinds["legacy"][1] > 0 and kinds["v2"][1] > 0, "a session kind completed no stream"
    assert kinds["legacy"][0] == 0 and kinds["v2"][0] > 0, "half-closes are for v2 sessions only"
    kills = re.search(r"uplink kill (\d+), stall \d+, server restart (\d+)", proc.stdout)
    if int(kills.group(1)) + int(kills.group(2)):
        assert figures["reconnects"] >= 1
    assert "corrupt 0, hung 0" in proc.stdout
    assert "server sockets in CLOSE_WAIT 30 s after the last client: 0" in proc.stdout
    fds = dict((m.group(1), (int(m.group(2)), int(m.group(3)))) for m in
               re.finditer(r"^(server|device|device-v2) .* (-?\d+) +(-?\d+)$", proc.stdout, re.M))
    assert sorted(fds) == ["device", "device-v2", "server"]
    for name in ("device", "device-v2"):
        start, end = fds[name]
        assert end == start, "%s holds other descriptors than at the start" % name
