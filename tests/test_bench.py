"""Smoke test of scripts/bench: tiny sizes, real processes, sane JSON.

Not a measurement: it checks that every variant that is installed runs end to
end, that the numbers are plausible, and that a missing peer is skipped.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.bench]   # real processes throughout

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "scripts", "bench")

SMALL = ["--quick", "--json", "--seconds", "0.3", "--rounds", "100", "--conn-seconds", "0.3",
         "--streams", "10"]


def run_bench(args, env=None, timeout=90):
    proc = subprocess.run([sys.executable, BENCH] + args, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, timeout=timeout, env=env)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def check_variant(name, r):
    for key in ("tput_1_gbps", "tput_4_gbps", "tput_1_rev_gbps"):
        assert 0.001 < r[key] < 1000, (name, key, r[key])
    assert 0 < r["latency_p50_us"] <= r["latency_p99_us"] < 1e6, (name, r)
    assert r["conn_per_s"] > 1 and r["conn_errors"] == 0, (name, r)
    if name == "direct":
        assert "device_rss_idle_kb" not in r
        return
    assert r["device_cpu_s_per_gb"] >= 0
    assert 500 < r["device_rss_idle_kb"] < 1024 * 1024, (name, r)
    assert r["device_rss_busy_kb"] >= r["device_rss_idle_kb"] - 1024
    assert r["device_threads_idle"] >= 1
    # Whatever the streams cost, it is gone once they closed.
    assert r["device_threads_after"] <= r["device_threads_idle"]


def check_paused_row(name, r):
    assert 0.001 < r["tput_4dl_gbps"] < 1000, (name, r)
    assert r["tput_4dl_paused_gbps"] >= 0 and r["paused_max_gap_s"] >= 0, (name, r)
    assert r["paused_ratio"] == pytest.approx(r["tput_4dl_paused_gbps"] / r["tput_4dl_gbps"])


def test_every_installed_variant_runs_with_the_builtin_generator():
    code, out, err = run_bench(SMALL + ["--no-iperf3"])
    assert code == 0, err
    report = json.loads(out)
    assert report["bulk_tool"] == "built-in generator"
    assert set(report["ran"]) | set(report["skipped"]) == {"direct", "socat", "ssh", "tcprc-legacy", "tcprc",
                                                           "tcprc-tls"}
    assert {"direct", "tcprc", "tcprc-legacy"} <= set(report["ran"]), report["errors"]
    for name in report["skipped"]:
        assert "skipping" in err and name in report["skipped"]
    for name in report["ran"]:
        check_variant(name, report["results"][name])
    assert report["settings"]["streams"] == 10
    assert {"date", "machine", "cpu", "cores"} <= set(report["machine"])
    ratio = report["ratios"]["tcprc/direct"]["tput_1_gbps"]
    assert ratio == pytest.approx(report["results"]["tcprc"]["tput_1_gbps"]
                                  / report["results"]["direct"]["tput_1_gbps"])
    names = {t["target"] for t in report["targets"]}
    assert {"device RSS idle <= 14 MB (KB)", "device RSS idle with an id <= 16 MB (KB)"} <= names
    assert {"v2: 1 stream >= 0.9x legacy", "v2: latency p50 <= 1.05x legacy",
            "v2: 4 streams, 5th paused >= 0.8x not"} <= names
    assert set(report["ratios"]["tcprc/tcprc-legacy"]) >= {"tput_1_gbps", "tput_4_gbps", "latency_p50_us"}
    # The paused-client row, for v2 and legacy side by side.
    v2, legacy = report["results"]["tcprc"], report["results"]["tcprc-legacy"]
    for name in ("tcprc", "tcprc-legacy"):
        check_paused_row(name, report["results"][name])
    assert "4 downloads while a fifth client is paused" in err
    # v2 keeps the paused client's stream: it reads all its download once it reads.
    assert v2["paused_completed"] == "1 of 1", v2
    # Legacy stalls the uplink behind it until stall_timeout cuts it.
    assert legacy["paused_completed"].startswith("0 of 1 (cut: "), legacy
    if "tcprc-tls" in report["ran"]:   # skipped without the openssl command
        tls = report["results"]["tcprc-tls"]
        assert 0 < tls["tls_handshake_ms"] < 10000 and tls["tls_version"] in ("TLSv1.2", "TLSv1.3"), tls
        assert "tls_handshake_ms" not in v2
        assert {"TLS: device RSS idle with an id <= 19 MB (KB)", "TLS: 1 stream >= 0.6x plain v2"} <= names
        for name in ("tcprc", "tcprc-tls"):   # both measured again with an id and a secret
            assert report["results"][name]["device_rss_idle_id_kb"] > 1000
        assert ("TLS: 1 stream >= 1.5x ssh -R" in names) == ("ssh" in report["ran"])
    for t in report["targets"]:
        assert isinstance(t["ok"], bool) and isinstance(t["value"], (int, float))


@pytest.mark.skipif(not shutil.which("iperf3"), reason="iperf3 is not installed")
def test_tcprc_with_iperf3_and_the_text_table():
    code, out, err = run_bench(["--quick", "--only", "tcprc", "--rounds", "50",
                                "--conn-seconds", "0.2", "--streams", "5"])
    assert code == 0, err
    assert "bulk traffic: iperf3" in out
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip()
            for line in out.splitlines() if line.startswith("| ")}
    for label in ("throughput 1 stream (Gbit/s)", "throughput 4 streams (Gbit/s)",
                  "throughput 1 stream, reverse (Gbit/s)", "device CPU seconds per GB"):
        assert float(rows[label]) > 0, (label, out)
    assert int(rows["device threads after they closed"]) <= int(rows["device threads idle"])
    assert "targets (tcprc):" in out and "RSS per open stream <= 20 KB" in out


def check_paused_row(name, r):
    assert 0.001 < r["tput_4dl_gbps"] < 1000, (name, r)
    assert r["tput_4dl_paused_gbps"] >= 0 and r["paused_max_gap_s"] >= 0, (name, r)
    assert r["paused_ratio"] == pytest.approx(r["tput_4dl_paused_gbps"] / r["tput_4dl_gbps"])


def test_a_missing_peer_is_skipped_with_a_line():
    # A PATH with only the interpreter: no socat, no ssh, no iperf3.
    env = dict(os.environ, PATH=os.path.dirname(sys.executable))
    code, out, err = run_bench(SMALL + ["--only", "direct,socat,ssh"], env=env)
    assert code == 0, err
    report = json.loads(out)
    assert report["ran"] == ["direct"]
    assert "socat is not installed" in report["skipped"]["socat"]
    assert "is not installed" in report["skipped"]["ssh"]
    assert "skipping socat relay: socat is not installed" in err
    assert "iperf3 is not installed: using the built-in generator" in err
    check_variant("direct", report["results"]["direct"])


def test_unknown_variant_is_one_line_and_exit_2():
    code, out, err = run_bench(["--only", "direct,telnet"])
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("bench: unknown variant telnet (choose from direct, socat, ssh, tcprc")


def test_the_rss_breakdown_adds_up_and_names_where_openssl_is():
    """`--breakdown`: the parts of each idle device's RSS add up to its VmRSS; only
    the TLS device maps libcrypto (the id's HMAC needs none); the device's own
    count of its Python objects is there."""
    code, out, err = run_bench(["--breakdown", "--json"], timeout=120)
    assert code == 0, err
    assert json.loads(out)["deployment"].startswith("tcprc from a venv of its own")
    report = json.loads(out)["breakdown"]
    assert set(report) == {"plain", "id", "tls-id"}
    for key, device in report.items():
        parts = device["parts"]
        assert device["total_rss_kb"] == sum(p["rss_kb"] for p in parts.values())
        # smaps and VmRSS are read one after the other: a few pages may move between.
        assert abs(device["total_rss_kb"] - device["vmrss_kb"]) <= 256, (key, device)
        assert parts["interpreter (python, libpython)"]["rss_kb"] > 1000
        assert parts["thread stacks"]["rss_kb"] > 0
        assert 0 < device["pymalloc"]["allocated_bytes"] <= device["pymalloc"]["arena_bytes"]
        for part in parts.values():
            assert 0 <= part["private_kb"] <= part["rss_kb"]
    assert "shared library: libcrypto" not in report["plain"]["parts"]
    assert "shared library: libcrypto" not in report["id"]["parts"]
    assert report["tls-id"]["parts"]["shared library: libcrypto"]["rss_kb"] > 500


def test_tcprc_runs_from_a_venv_of_its_own_as_the_readme_installs_it(tmp_path):
    """The bench's default install: a venv (no pip, no network) that imports tcprc from
    this checkout through a .pth holding only its path, and none of the base
    interpreter's site-packages (where a build machine's .pth files run code at
    every start, which a gateway has not); tomli linked in below 3.11."""
    from benchkit.install import make_venv
    command = make_venv(sys.executable, REPO, str(tmp_path / "venv"))
    assert command == str(tmp_path / "venv" / "bin" / "tcprc")
    version = subprocess.run([command, "--version"], stdout=subprocess.PIPE, universal_newlines=True,
                             timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("tcprc "), version
    probe = subprocess.run([str(tmp_path / "venv" / "bin" / "python"), "-c",
                            "import json, sys, tcprc\n"
                            "if sys.version_info >= (3, 11):\n import tomllib\nelse:\n import tomli\n"
                            "print(json.dumps([tcprc.__file__, sys.path, sorted(sys.modules)]))"],
                           stdout=subprocess.PIPE, universal_newlines=True, timeout=30, cwd=str(tmp_path))
    assert probe.returncode == 0
    tcprc_file, path, modules = json.loads(probe.stdout)
    assert tcprc_file == os.path.join(REPO, "tcprc", "__init__.py")
    import sysconfig
    assert sysconfig.get_paths()["purelib"] not in path, path   # the base interpreter's site-packages
    site_dir = [p for p in path if p.startswith(str(tmp_path))]
    assert len(site_dir) == 1, path
    pth = [name for name in os.listdir(site_dir[0]) if name.endswith(".pth")]
    assert pth == ["tcprc-checkout.pth"]
    with open(os.path.join(site_dir[0], pth[0])) as f:
        assert f.read() == REPO + "\n"   # a path line only: it runs no code


@pytest.mark.parametrize("install", ["venv", "pythonpath"])
def test_another_checkout_is_compiled_and_run_not_this_one(tmp_path, install):
    """--baseline DIR: the other checkout's modules are the ones byte-compiled and
    imported, although the bench runs from this one."""
    from benchkit.variants import Tcprc
    other = tmp_path / "other"
    shutil.copytree(os.path.join(REPO, "tcprc"), str(other / "tcprc"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    variant = Tcprc(sys.executable, repo=str(other), install=install)
    try:
        assert variant.missing() is None
        pycache = other / "tcprc" / "__pycache__"
        compiled = os.listdir(str(pycache)) if pycache.exists() else []
        assert "cli.%s.pyc" % sys.implementation.cache_tag in compiled, compiled
    finally:
        variant.close()
