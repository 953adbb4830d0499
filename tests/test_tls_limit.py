"""Smoke test of scripts/tls-limit: every row runs end to end with real relays and iperf3.

Not a measurement (one 1-second run per row): it checks that each chain
carries iperf3's traffic, that TLS 1.3 is what the relays speak, and that
every row and ratio the documentation quotes is in the report.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.bench]   # real processes throughout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "tls-limit")
ROWS = ("direct", "plain", "sslsocket", "sslobject", "tcprc", "tcprc-tls")
RELAY_ROWS = ("plain", "sslsocket", "sslobject", "tcprc", "tcprc-tls")
RATIOS = ("sslsocket/plain", "sslobject/plain", "tcprc-tls/tcprc")


def run(args, python=sys.executable):
    proc = subprocess.run([python, SCRIPT] + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=180)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 is not installed (tls-limit measures with it)")
@pytest.mark.skipif(not shutil.which("openssl"), reason="the openssl command is not installed (certificates)")
def test_smoke_run_has_every_row_with_positive_numbers():
    code, out, err = run(["--smoke", "--json"])
    assert code == 0, err
    report = json.loads(out)
    assert report["errors"] == {} and report["skipped"] == {}, (report["errors"], report["skipped"])
    assert set(report["results"]) == set(ROWS)
    for name in ROWS:
        r = report["results"][name]
        assert 0.001 < r["gbps"] < 1000, (name, r)
        assert len(r["gbps_runs"]) == 1 and r["gbps_runs"][0] > 0, (name, r)
    for name in RELAY_ROWS:
        r = report["results"][name]
        # Both processes of the chain worked for the bytes that went through.
        assert r["cpu_s_per_gb_enc"] > 0 and r["cpu_s_per_gb_dec"] > 0, (name, r)
        assert r["cpu_s_per_gb_total"] == pytest.approx(r["cpu_s_per_gb_enc"] + r["cpu_s_per_gb_dec"])
    for name in ("sslsocket", "sslobject"):
        assert report["results"][name]["cipher"].startswith("TLSv1.3 "), report["results"][name]
    assert "cipher" not in report["results"]["plain"]
    for key in RATIOS:
        top, bottom = key.split("/")
        assert report["ratios"][key] == pytest.approx(report["results"][top]["gbps"]
                                                      / report["results"][bottom]["gbps"])
    assert report["openssl"].startswith("OpenSSL")


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 is not installed (tls-limit measures with it)")
@pytest.mark.skipif(not shutil.which("openssl"), reason="the openssl command is not installed (certificates)")
def test_the_text_table_names_every_row_and_ratio_and_the_relays_run_on_python_3_8():
    # With --syscalls when strace is installed: the counts the documentation quotes.
    py38 = "/root/.pyenv/versions/3.8.18/bin/python"
    python = py38 if os.access(py38, os.X_OK) else sys.executable
    traced = bool(shutil.which("strace"))
    code, out, err = run(["--smoke", "--no-tcprc", "--python", python] + (["--syscalls"] if traced else []))
    assert code == 0, err
    if traced:   # each relay's busiest system calls, counted per GB
        lines = [line for line in out.splitlines() if " relay " in line and line.startswith("  ")]
        assert len(lines) == 6, out
        for line in lines:
            busiest = line.split(" relay ", 1)[1].split(", ")[0].split()   # "recvfrom 3878"
            assert int(busiest[1]) > 0, line
    for label in ("direct (no relay)", "b. plain relays", "c. TLS, SSLSocket", "d. TLS, SSLObject+BIO",
                  "c/b: SSLSocket / plain relays (the ceiling)", "d/b: SSLObject+BIO / plain relays",
                  "TLS between the relays: TLSv1.3"):
        assert label in out, out
    assert "tcprc" not in out.split("openssl:")[1].split("TLS between")[0], out
    if python == py38:
        assert "Python 3.8" in out


def test_bad_arguments_end_with_status_2():
    code, _, err = run(["--reps", "0"])
    assert code == 2 and "--reps must be positive" in err
