"""`tcprc ctl -c FILE` without --role takes the role of FILE's tables and says so in
one line on stderr (issue 20): a server's config reaches the server."""

import pytest

from support.agents import Agents, run_tcprc
from support.net import free_port, listening
from support.waiting import wait_for

pytestmark = pytest.mark.e2e


def test_a_server_config_reaches_the_server_without_role(tmp_path):
    agents = Agents(tmp_path)
    listen = free_port()
    try:
        server = agents.start("server", config='[server]\nlisten = "127.0.0.1:%d"\n'
                              'host = "127.0.0.1:0"\n' % listen)
        wait_for(lambda: listening(listen) or server.poll() is not None, what="server up")
        config = tmp_path / "server-0.toml"
        result = run_tcprc("ctl", "-c", str(config), "status")
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == "OK" and "state: " in result.stdout
        assert result.stderr == ("tcprc ctl: role server, from %s: it has a [server] table "
                                 "(--role to choose)\n" % config)
        result = run_tcprc("ctl", "-c", str(config), "--role", "server", "status")
        assert result.returncode == 0 and result.stderr == ""   # told: nothing to say
    finally:
        agents.stop_all()


@pytest.mark.parametrize("text, why", [
    ('[device]\nserver = "127.0.0.1:9"\n', "it has a [device] table"),
    ('[console]\nport = ""\n', "it has a [console] table"),
    ('[log]\nlevel = "info"\n', "it has no [server], [device] or [console] table, so the default"),
    ('[server]\n[device]\n', "it has [server] and [device]/[console] tables, so the default"),
])
def test_the_role_it_takes_is_named(tmp_path, text, why):
    config = tmp_path / "c.toml"
    config.write_text(text + '[control]\nsocket = "%s"\n' % (tmp_path / "none.sock"))
    result = run_tcprc("ctl", "-c", str(config), "status")
    lines = result.stderr.splitlines()
    assert lines[0] == "tcprc ctl: role device, from %s: %s (--role to choose)" % (config, why)
    if "[server]" in text:   # a device config with a [server] table does not load
        assert result.returncode == 2 and "unknown section [server]" in lines[1]
    else:
        assert result.returncode == 2 and lines[1].startswith("tcprc ctl: no agent answers on")
