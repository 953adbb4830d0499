"""scripts/tcprc-watchdog driving the real init script and agent in a temp dir."""

import fcntl
import os
import signal
import subprocess

import pytest

from support.gateway import WATCHDOG, Gateway, alive, shell_argv
from support.waiting import wait_for

pytestmark = pytest.mark.e2e   # real processes throughout


@pytest.fixture
def gateway(tmp_path):
    gw = Gateway(tmp_path)
    yield gw
    gw.cleanup()


def lock_is_free(path):
    with open(str(path), "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(handle, fcntl.LOCK_UN)
        return True


@pytest.mark.parametrize("shell", ["dash", "busybox-ash"])
def test_starts_an_agent_that_is_not_running(gateway, shell):
    res = gateway.watchdog(shell)
    assert res.returncode == 0, res.stderr
    pid = gateway.pid()
    assert pid and gateway.agents() == [pid]
    assert "was not running (status 3), started it" in res.stderr
    # The agent must not inherit the watchdog's lock, or no later run could take it.
    assert lock_is_free(gateway.run / "wd.lock")


def test_restarts_an_agent_killed_with_sigkill(gateway):
    assert gateway.init("start").returncode == 0
    old = gateway.pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not alive(old))
    res = gateway.watchdog()
    assert res.returncode == 0, res.stderr
    assert "was not running (status 1)" in res.stderr
    new = gateway.pid()
    assert new != old and gateway.agents() == [new]


def test_leaves_a_healthy_agent_alone(gateway):
    assert gateway.init("start").returncode == 0
    pid = gateway.pid()
    for _ in range(2):
        res = gateway.watchdog()
        assert res.returncode == 0, res.stderr
        assert res.stderr == ""
    assert gateway.agents() == [pid]


def test_restarts_an_agent_that_does_not_answer(gateway):
    assert gateway.init("start").returncode == 0
    old = gateway.pid()
    os.kill(old, signal.SIGSTOP)   # alive, pidfile locked, but deaf
    res = gateway.watchdog()
    assert res.returncode == 0, res.stderr
    assert "is hung" in res.stderr and "restarted" in res.stderr
    new = gateway.pid()
    assert new != old and not alive(old) and gateway.agents() == [new]


def test_agent_without_control_socket_is_not_restarted(gateway):
    gateway.conf.write_text('[device]\nserver = ""\n[control]\nsocket = ""\n[log]\ntarget = "%s"\n'
                            % gateway.log)
    assert gateway.init("start").returncode == 0
    pid = gateway.pid()
    res = gateway.watchdog()
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert gateway.agents() == [pid]


@pytest.mark.parametrize("lock", ["flock", "mkdir"])
def test_concurrent_runs_start_one_agent(gateway, lock):
    env = dict(gateway.env, TCPRC_FLOCK="" if lock == "flock" else "no")
    runs = [subprocess.Popen(shell_argv("dash") + [str(WATCHDOG)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
            for _ in range(3)]
    outputs = [run.communicate(timeout=30) for run in runs]
    assert all(run.returncode == 0 for run in runs), outputs
    pid = wait_for(gateway.pid)
    assert gateway.agents() == [pid]
    assert sum("started it" in err for _, err in outputs) == 1, outputs
    assert not (gateway.run / "wd.lock.d").exists()


def test_hands_off_while_another_run_holds_the_flock(gateway):
    gateway.run.mkdir()
    with open(str(gateway.run / "wd.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        res = gateway.watchdog()
    assert res.returncode == 0
    assert "another run holds" in res.stderr
    assert gateway.agents() == [] and gateway.pid() is None


def test_mkdir_lock_live_owner_blocks_stale_owner_does_not(gateway):
    env = {"TCPRC_FLOCK": "no"}
    lockdir = gateway.run / "wd.lock.d"
    lockdir.mkdir(parents=True)
    (lockdir / "pid").write_text("%d\n" % os.getpid())
    res = gateway.watchdog(env=env)
    assert res.returncode == 0 and "another run holds" in res.stderr
    assert gateway.agents() == []

    dead = subprocess.Popen(["true"])
    dead.wait()
    (lockdir / "pid").write_text("%d\n" % dead.pid)
    res = gateway.watchdog(env=env)
    assert res.returncode == 0, res.stderr
    assert "removing stale lock" in res.stderr and "started it" in res.stderr
    assert gateway.agents() == [gateway.pid()]
    assert not lockdir.exists()


# Loaded by every Python the test starts (PYTHONPATH): it ends the device's supervisor
# thread once, past every fault barrier (SystemExit), as a defect nobody foresaw would.
_KILL_SUPERVISOR = '''
import os
_MARK = %r
if os.path.exists(_MARK):
    from tcprc.device import app as _app
    _real = _app.DeviceApp._beat_wait

    def _beat_wait(self, timeout):
        if os.path.exists(_MARK):
            os.unlink(_MARK)
            raise SystemExit()
        return _real(self, timeout)
    _app.DeviceApp._beat_wait = _beat_wait
'''


def test_restarts_an_agent_whose_critical_thread_died(gateway):
    """The process lives and answers on its control socket, but its tunnel is dead:
    `health` says so, and the watchdog restarts it."""
    hooks = gateway.dir / "hooks"
    hooks.mkdir()
    mark = gateway.dir / "kill-the-supervisor"
    mark.write_text("")
    (hooks / "sitecustomize.py").write_text(_KILL_SUPERVISOR % str(mark))
    env = {"PYTHONPATH": "%s:%s" % (hooks, gateway.env["PYTHONPATH"])}
    assert gateway.init("start", env=env).returncode == 0
    old = gateway.pid()
    wait_for(lambda: not mark.exists(), what="the supervisor thread killed")
    check = gateway.init("check", env=env)
    assert check.returncode == 4 and "unhealthy" in check.stdout, check.stdout
    assert "tcprc-device (supervisor) has ended" in check.stdout
    res = gateway.watchdog(env=env)
    assert res.returncode == 0, res.stderr
    assert "is unhealthy" in res.stderr and "restarted" in res.stderr
    new = gateway.pid()
    assert new != old and not alive(old) and gateway.agents() == [new]
    assert gateway.init("check", env=env).returncode == 0   # the new agent is healthy
