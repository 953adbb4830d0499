"""Typed settings against the schema, and the error hierarchy of the ops modules."""

import os
import subprocess
import sys
import typing

import pytest

from support import ROOT
from tcprc import errors
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import SCHEMA, SECTION_TYPES, build_config, load_config
from tcprc.device.app import DeviceApp
from tcprc.settings import DeviceEntry, DeviceSettings, Secret


@pytest.mark.parametrize("role", sorted(SCHEMA))
def test_every_schema_key_is_a_settings_field_and_back(role):
    for section, keys in SCHEMA[role].items():
        kind = SECTION_TYPES[section]
        hints = typing.get_type_hints(kind)
        assert set(kind._fields) == set(keys), (role, section)
        for key, spec in keys.items():
            if (section, key) in RESOLVED:   # built from the file's value at start
                assert hints[key] == RESOLVED[section, key], (role, section, key)
                continue
            hint = getattr(hints[key], "__origin__", hints[key])   # List[str] -> list
            assert hint is spec.type, (role, section, key, hints[key])


# Fields that hold what config builds from a key, not the key's own value.
RESOLVED = {("device", "server"): typing.Tuple[str, ...],     # a string or a list: a tuple
            ("device", "secret"): typing.Optional[Secret],
            ("device", "services"): typing.Mapping[str, str],
            ("server", "devices"): typing.Mapping[str, DeviceEntry],
            ("server", "http_token"): typing.Optional[Secret],
            ("cluster", "secret"): Secret}


def test_config_sections_are_typed_and_immutable():
    cfg = build_config("device", {"device": {"server": "192.0.2.1:9000"}}, "test")
    assert isinstance(cfg.device, DeviceSettings)
    assert cfg.device.server == ("192.0.2.1:9000",) and cfg.log.level == "info"
    with pytest.raises(AttributeError):
        cfg.device.server = ("elsewhere:1",)


def test_config_set_hands_the_app_a_new_object_and_leaves_the_old_one(tmp_path):
    cfg = build_config("device", {}, "test")
    app = DeviceApp(cfg.device)
    app.start()
    try:
        before = app.settings
        parser = CommandParser(app, cfg)
        assert parser.execute("config set device.stall_timeout 12") == ["OK"]
        assert app.settings is not before and app.settings.stall_timeout == 12.0
        assert before.stall_timeout == 30.0 and cfg.device is app.settings
        assert parser.execute("config get device.stall_timeout") == [
            "device.stall_timeout = 12.0", "OK"]
    finally:
        app.close()


def test_ops_errors_are_local_errors_and_peer_errors_are_apart(tmp_path):
    for name in ("ConfigError", "ControlError", "PidFileError", "AlreadyRunning", "CommandError"):
        kind = getattr(errors, name)
        assert issubclass(kind, errors.LocalError) and issubclass(kind, errors.TcprcError), name
        assert not issubclass(kind, errors.PeerError), name
    assert issubclass(errors.PeerError, errors.TcprcError)
    with pytest.raises(errors.LocalError, match="no such file"):
        load_config(str(tmp_path / "missing.toml"), "device")


def test_settings_and_ops_import_no_engine_and_no_app():
    """settings/errors/addr stand alone; the ops modules reach device and server
    only through the cli-level wiring (channels, cli)."""
    code = ("import sys; import tcprc.settings, tcprc.errors\n"
            "first = sorted(m for m in sys.modules if m.startswith('tcprc'))\n"
            "import tcprc.ops.config, tcprc.ops.commands, tcprc.ops.control, tcprc.ops.ctl, "
            "tcprc.ops.console, tcprc.ops.service, tcprc.ops.tomlwrite\n"
            "print(' '.join(first)); print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith('tcprc'))))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=30, env=dict(os.environ, PYTHONPATH=ROOT))
    assert result.returncode == 0, result.stderr
    first, after = result.stdout.split("\n")[:2]
    assert first.split() == ["tcprc", "tcprc.errors", "tcprc.settings"]
    allowed = {"tcprc", "tcprc.errors", "tcprc.settings", "tcprc.addr", "tcprc.ops"}
    assert {m for m in after.split() if not m.startswith("tcprc.ops.")} <= allowed, after
