"""The one command table: dispatch, help and the role restriction all follow it."""

import pytest

from tcprc.ops.commands import COMMANDS, CommandParser
from tcprc.ops.config import build_config
from tcprc.server.app import ServerApp


@pytest.fixture
def server_parser():
    cfg = build_config("server", {"control": {"socket": ""}}, "test")
    app = ServerApp(cfg.server)   # not started: these commands never reach it
    return CommandParser(app, cfg)


def test_table_names_are_unique_and_every_entry_is_complete():
    names = [command.name.lower() for command in COMMANDS]
    assert len(names) == len(set(names))
    for command in COMMANDS:
        assert command.roles and set(command.roles) <= {"device", "server"}, command.name
        assert command.syntax.lower().startswith(command.name.lower()) and command.summary
        assert callable(command.handler)


def test_server_help_lists_exactly_its_commands_in_table_order(server_parser):
    lines = server_parser.execute("help")
    listed = [line for line in lines[:-2] if not line.startswith("    ")]
    assert listed == [c.syntax for c in COMMANDS if "server" in c.roles]
    assert "TCPRemoteConnect" not in "\n".join(lines) and lines[-1] == "OK"


def test_each_command_outside_its_roles_is_refused_by_name(server_parser):
    refused = [c for c in COMMANDS if "server" not in c.roles]
    assert [c.name for c in refused] == ["TCPRemoteConnect", "TCPRemoteDisconnect"]
    for command in refused:
        for typed in (command.name, command.name.upper()):
            assert server_parser.execute(typed + " 192.0.2.1 9000") == [
                "ERROR %s is not available on the server" % command.name]
        detail = server_parser.execute("help " + command.name.lower())
        assert detail[0] == command.syntax and detail[-2:] == [
            "  (not available on the server)", "OK"]


def test_server_runs_the_commands_it_has(server_parser):
    assert server_parser.execute("config get server.takeover") == [
        "server.takeover = true", "OK"]
