"""scripts/soak in quick mode (~20 s): random clients and faults, nothing wrong or hung."""

import os
import re
import subprocess
import sys

import pytest

from support import ROOT

pytestmark = [pytest.mark.faults, pytest.mark.e2e]


def test_a_short_soak_verifies_streams_through_faults_and_reconnects():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak"), "--minutes", "0.33",
                           "--seed", "14", "--fault-every", "4"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True,
                          timeout=240, cwd=ROOT)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout
    figures = dict((m.group(1), int(m.group(2))) for m in
                   re.finditer(r"^(streams|bytes verified|faults injected|reconnects): (\d+)", proc.stdout, re.M))
    assert figures["streams"] > 0 and figures["bytes verified"] > 0
    assert figures["faults injected"] > 0
    kills = re.search(r"uplink kill (\d+), stall \d+, server restart (\d+)", proc.stdout)
    if int(kills.group(1)) + int(kills.group(2)):
        assert figures["reconnects"] >= 1
    assert "corrupt 0, hung 0" in proc.stdout
    fds = re.findall(r"^(server|device) .* (\d+) +(\d+)$", proc.stdout, re.M)
    assert [name for name, _, _ in fds] == ["server", "device"]
    device_start, device_end = (int(v) for v in fds[1][1:])
    assert device_end == device_start, "the device holds other descriptors than at the start"
