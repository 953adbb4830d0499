"""What ships for installing (issue 20): the systemd units as they are, verified by
systemd-analyze against a root that holds the binary they name; the OpenWrt procd
script, run under dash and busybox ash with a stand-in for rc.common and procd that
records what it asks for, whose command is then started for real; and the README,
units and init scripts naming the same paths."""

import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

from support.agents import run_tcprc
from support.gateway import REPO, shell_argv
from support.waiting import wait_for

pytestmark = pytest.mark.e2e

UNITS = REPO / "etc" / "systemd"
PROCD = REPO / "etc" / "openwrt" / "tcprc"
README = (REPO / "README.md").read_text()
BINARY = "/usr/local/bin/tcprc"   # README's symlink into its venv


def readme_section(title):
    start = README.index("\n## %s\n" % title)
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


# ---- systemd ------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit, role", [("tcprc.service", "device"), ("tcprc-server.service", "server")])
def test_the_units_as_shipped_verify(tmp_path, unit, role):
    """The file byte for byte, in a root where the programs it names exist: systemd's
    own unit files (for its targets), /bin/kill and /usr/local/bin/tcprc."""
    text = (UNITS / unit).read_text()
    root = tmp_path / "root"
    (root / "etc" / "systemd" / "system").mkdir(parents=True)
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    shutil.copytree("/usr/lib/systemd/system", str(root / "usr" / "lib" / "systemd" / "system"),
                    symlinks=True)
    (root / "bin").mkdir()
    shutil.copy(shutil.which("kill") or "/bin/kill", str(root / "bin" / "kill"))
    (root / "usr" / "local" / "bin").mkdir(parents=True)
    tcprc = root / BINARY.lstrip("/")
    tcprc.write_text('#!/bin/sh\nexec "%s" -m tcprc "$@"\n' % sys.executable)
    tcprc.chmod(0o755)
    (root / "etc" / "systemd" / "system" / unit).write_text(text)

    def verify():
        return subprocess.run(["systemd-analyze", "verify", "--root=%s" % root, unit],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=60)
    res = verify()
    assert res.returncode == 0 and res.stdout == "", res.stdout
    lines = text.splitlines()
    start = [line for line in lines if line.startswith("ExecStart=")]
    assert start == ["ExecStart=%s %s -c ${TCPRC_CONF} $TCPRC_OPTS" % (BINARY, role)]   # foreground
    for setting in ("User=tcprc", "Group=tcprc", "NoNewPrivileges=yes", "ProtectSystem=strict",
                    "ProtectHome=yes", "PrivateTmp=yes", "Restart=on-failure",
                    "RestartPreventExitStatus=2", "ExecReload=/bin/kill -HUP $MAINPID",
                    "Environment=MALLOC_ARENA_MAX=1 GLIBC_TUNABLES=glibc.pthread.stack_cache_size=0"):
        assert setting in lines, setting
    assert not [line for line in lines if line.startswith("AmbientCapabilities=")]
    tcprc.unlink()   # the check is real: without the binary it fails
    res = verify()
    assert res.returncode != 0 and "%s is not executable" % BINARY in res.stdout


def test_readme_units_and_init_scripts_name_the_same_paths():
    section = readme_section("Installing on a gateway")
    assert "python3 -m venv /opt/tcprc" in section and "cd tcprc" in section
    assert "ln -s /opt/tcprc/bin/tcprc %s" % BINARY in section
    assert "useradd --system" in section and "install -d -o tcprc -g tcprc -m 700 /etc/tcprc" in section
    assert "AmbientCapabilities=CAP_NET_BIND_SERVICE" in section
    assert "/etc/init.d/tcprc enable" in section and "logread" in section
    assert "update-rc.d tcprc defaults" in section
    init = (REPO / "etc" / "init.d" / "tcprc").read_text()
    assert "TCPRC_DAEMON=%s\n" % BINARY in init
    for unit in ("tcprc.service", "tcprc-server.service"):
        assert "ExecStart=%s " % BINARY in (UNITS / unit).read_text()


# ---- OpenWrt: procd -----------------------------------------------------------------------

# A stand-in for OpenWrt's /etc/rc.common and procd.sh: the same flow (source the
# script, then the procd versions of start, reload, enable), with procd's functions
# recording what they were asked, one line each, arguments separated by "|".
RC_COMMON = r'''#!/bin/sh
initscript=$1
action=${2:-help}
shift 2
start_service() { return 0; }
stop_service() { return 0; }
record() { printf '%s\n' "$*" >> "$RECORD"; }
. "$initscript"
[ -n "$USE_PROCD" ] || { echo "not a procd script" >&2; exit 1; }
basescript=$(readlink "$initscript")
procd_open_service() { record "open_service|$1"; }
procd_close_service() { record "close_service"; }
procd_open_instance() { record "open_instance"; }
procd_set_param() { line="set_param"; for a in "$@"; do line="$line|$a"; done; record "$line"; }
procd_close_instance() { record "close_instance"; }
procd_send_signal() { record "send_signal|$1|$2|$3"; }
procd_kill() { record "kill|$1"; }
rc_procd() { procd_open_service "$(basename "${basescript:-$initscript}")"; "$@"; procd_close_service; }
start() { rc_procd start_service "$@"; }
stop() { stop_service "$@"; procd_kill "$(basename "${basescript:-$initscript}")"; }
reload() { if type reload_service >/dev/null 2>&1; then reload_service "$@"; else start; fi; }
enable() {
    name=$(basename "$initscript")
    [ "$START" ] && ln -sf "../init.d/$name" "$IPKG_INSTROOT/etc/rc.d/S${START}${name}"
    [ "$STOP" ] && ln -sf "../init.d/$name" "$IPKG_INSTROOT/etc/rc.d/K${STOP}${name}"
}
$action "$@"
'''


class OpenWrt:
    """/etc/init.d and /etc/rc.d in a temporary root, the script installed as `name`."""

    def __init__(self, tmp_path, name="tcprc"):
        self.root = tmp_path / "owrt"
        (self.root / "etc" / "init.d").mkdir(parents=True)
        (self.root / "etc" / "rc.d").mkdir()
        self.rc_common = self.root / "etc" / "rc.common"
        self.rc_common.write_text(RC_COMMON)
        self.script = self.root / "etc" / "init.d" / name
        shutil.copy(str(PROCD), str(self.script))
        self.record = tmp_path / "procd.log"
        self.defaults = tmp_path / "default-tcprc"

    def run(self, action, shell="dash", script=None, env=None):
        if self.record.exists():
            self.record.unlink()
        environment = dict(os.environ, RECORD=str(self.record), IPKG_INSTROOT=str(self.root),
                           TCPRC_DEFAULTS=str(self.defaults), **(env or {}))
        for key in ("TCPRC_ROLE", "TCPRC_DAEMON", "TCPRC_CONF", "TCPRC_OPTS"):
            environment.pop(key, None)
        done = subprocess.run(shell_argv(shell) + [str(self.rc_common), str(script or self.script),
                                                   action],
                              env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              universal_newlines=True, timeout=30)
        assert done.returncode == 0, done.stdout
        return [line.split("|") for line in self.record.read_text().splitlines()] \
            if self.record.exists() else []


def test_the_procd_script_is_an_rc_common_script_of_posix_sh():
    text = PROCD.read_text()
    assert text.startswith("#!/bin/sh /etc/rc.common\n")
    assert os.access(str(PROCD), os.X_OK)
    for shell in ("dash", "busybox-ash"):
        done = subprocess.run(shell_argv(shell) + ["-n", str(PROCD)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, universal_newlines=True, timeout=30)
        assert done.returncode == 0 and done.stdout == "", done.stdout
    assert re.search(r"^USE_PROCD=1$", text, re.M) and re.search(r"^START=\d+$", text, re.M)
    assert re.search(r"^STOP=\d+$", text, re.M)


@pytest.mark.parametrize("shell", ["dash", "busybox-ash"])
@pytest.mark.parametrize("name, role, conf", [
    ("tcprc", "device", "/etc/tcprc/tcprc.toml"),
    ("tcprc-server", "server", "/etc/tcprc/tcprc-server.toml"),
])
def test_start_asks_procd_for_a_supervised_foreground_agent(tmp_path, shell, name, role, conf):
    owrt = OpenWrt(tmp_path, name)
    asked = owrt.run("start", shell)
    assert asked == [
        ["open_service", name],
        ["open_instance"],
        ["set_param", "command", "/usr/bin/python3", "-m", "tcprc", role, "-c", conf],
        ["set_param", "env", "MALLOC_ARENA_MAX=1", "GLIBC_TUNABLES=glibc.pthread.stack_cache_size=0"],
        ["set_param", "respawn", "3600", "5", "5"],
        ["set_param", "stdout", "1"],
        ["set_param", "stderr", "1"],
        ["close_instance"],
        ["close_service"],
    ]
    assert owrt.run("reload", shell) == [["send_signal", name, "*", "1"]]   # 1: SIGHUP


@pytest.mark.parametrize("shell", ["dash", "busybox-ash"])
def test_pythonoptimize_from_the_defaults_file_joins_the_agents_environment(tmp_path, shell):
    owrt = OpenWrt(tmp_path)
    owrt.defaults.write_text("PYTHONOPTIMIZE=2\n")
    env = [call for call in owrt.run("start", shell) if call[:2] == ["set_param", "env"]]
    assert env == [["set_param", "env", "MALLOC_ARENA_MAX=1", "GLIBC_TUNABLES=glibc.pthread.stack_cache_size=0",
                    "PYTHONOPTIMIZE=2"]]


@pytest.mark.parametrize("shell", ["dash", "busybox-ash"])
def test_enable_links_it_into_rc_d_and_boot_through_the_link_names_the_service(tmp_path, shell):
    owrt = OpenWrt(tmp_path)
    owrt.run("enable", shell)
    links = sorted(os.listdir(str(owrt.root / "etc" / "rc.d")))
    start = [link for link in links if link.startswith("S")]
    assert len(start) == 1 and re.match(r"S\d\dtcprc$", start[0]) and len(links) == 2
    via_link = owrt.root / "etc" / "rc.d" / start[0]
    asked = owrt.run("start", shell, script=via_link)
    assert asked[0] == ["open_service", "tcprc"] and asked[2][5] == "device"
    assert owrt.run("reload", shell, script=via_link) == [["send_signal", "tcprc", "*", "1"]]


def test_the_command_procd_is_given_runs_the_agent_and_survives_its_reload(tmp_path):
    """/etc/default/tcprc as the README shows it; the recorded command and environment
    started as procd would start them; the recorded reload signal sent to it."""
    owrt = OpenWrt(tmp_path)
    sock = tmp_path / "tcprc.sock"
    conf = tmp_path / "tcprc.toml"
    conf.write_text('[device]\nserver = ""\n[control]\nsocket = "%s"\n' % sock)
    owrt.defaults.write_text('TCPRC_DAEMON="%s -m tcprc"\nTCPRC_CONF=%s\nTCPRC_OPTS="--local '
                             '127.0.0.1:2222"\n' % (sys.executable, conf))
    asked = owrt.run("start", "busybox-ash")
    command = [row[2:] for row in asked if row[:2] == ["set_param", "command"]][0]
    assert command == [sys.executable, "-m", "tcprc", "device", "-c", str(conf), "--local",
                       "127.0.0.1:2222"]
    env = dict(item.split("=", 1) for row in asked if row[:2] == ["set_param", "env"]
               for item in row[2:])
    log = open(str(tmp_path / "agent.log"), "w+")
    agent = subprocess.Popen(command, env=dict(os.environ, PYTHONPATH=str(REPO), **env),
                             stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: run_tcprc("ctl", "--socket", str(sock), "status").returncode == 0
                 or agent.poll() is not None, timeout=20, what="the agent answers")
        assert agent.poll() is None
        status = run_tcprc("ctl", "--socket", str(sock), "config", "get", "device.local").stdout
        assert 'device.local = "127.0.0.1:2222"' in status
        signal_number = int(owrt.run("reload", "busybox-ash")[0][3])
        agent.send_signal(signal_number)
        wait_for(lambda: "reload" in open(str(tmp_path / "agent.log")).read().lower(),
                 what="the agent's reload line")
        assert agent.poll() is None
        assert run_tcprc("ctl", "--socket", str(sock), "status").returncode == 0
        assert signal_number == signal.SIGHUP
    finally:
        agent.terminate()
        agent.wait(10)
        log.close()
