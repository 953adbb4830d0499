"""Typed settings against the schema, and the error hierarchy of the ops modules."""

import os
import subprocess
import sys
import typing

import pytest

from support import ROOT
from support.fresh import python_output
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
        assert parser.execute("config set device.stall_timeout 12") == [
            "device.stall_timeout = 12.0: applied: a running tunnel redials with it", "OK"]
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
    """settings/keys/errors/addr stand alone; the ops modules reach device and server
    only through the cli-level wiring (channels, cli)."""
    code = ("import sys; import tcprc.settings, tcprc.errors\n"
            "first = sorted(m for m in sys.modules if m.startswith('tcprc'))\n"
            "import tcprc.ops.config, tcprc.ops.commands, tcprc.ops.control, tcprc.ops.ctl, "
            "tcprc.ops.console, tcprc.ops.service, tcprc.ops.tomlwrite\n"
            "print(' '.join(first)); print(' '.join(sorted(m for m in sys.modules "
            "if m.startswith('tcprc'))))")
    first, after = python_output(code, timeout=30).split("\n")[:2]
    assert first.split() == ["tcprc", "tcprc.addr", "tcprc.errors", "tcprc.keys",
                             "tcprc.settings"]
    allowed = {"tcprc", "tcprc.errors", "tcprc.settings", "tcprc.keys", "tcprc.addr", "tcprc.ops"}
    assert {m for m in after.split() if not m.startswith("tcprc.ops.")} <= allowed, after


# -- one schema for the link keys, and when each key applies ----------------------------

@pytest.mark.parametrize("role", ["device", "server"])
def test_the_settings_types_are_made_from_the_schema(role):
    """DeviceSettings and ServerSettings have one field per key of their table, in its
    order, the link keys among them, and are LinkSettings (what the engine names)."""
    from tcprc.keys import LINK_KEYS, link_keys
    from tcprc.settings import LinkSettings
    kind = SECTION_TYPES[role]
    assert kind._fields == tuple(SCHEMA[role][role])
    assert set(LINK_KEYS) <= set(kind._fields)
    for key, spec in link_keys(role).items():   # the very same entries, per role
        assert SCHEMA[role][role][key] == spec
        assert spec[:4] == LINK_KEYS[key][:4]
    settings = getattr(build_config(role, {}, "test"), role)
    assert isinstance(settings, LinkSettings) and isinstance(settings, tuple)
    assert settings.keepalive_idle == 60 and settings.window == 262144
    changed = settings._replace(window=65536)
    assert type(changed) is kind and changed.window == 65536
    assert repr(changed).startswith(kind.__name__ + "(")


def test_every_key_says_when_it_applies():
    from tcprc.keys import APPLIES
    from tcprc.ops.config import DEVICE_TABLE_KEYS
    for role, sections in SCHEMA.items():
        for section, keys in sections.items():
            for key, spec in keys.items():
                assert spec.applies in APPLIES, (role, section, key, spec.applies)
    assert set(DEVICE_TABLE_KEYS.values()) <= set(APPLIES)


def test_the_device_restarts_its_tunnel_for_the_keys_flagged_so():
    from tcprc.device.app import TUNNEL_KEYS
    from tcprc.keys import SESSION
    assert TUNNEL_KEYS == tuple(key for key, spec in SCHEMA["device"]["device"].items()
                                if spec.applies == SESSION)
    assert {"server", "local", "secret", "tls", "keepalive_idle", "window"} <= set(TUNNEL_KEYS)
    assert not {"reconnect_min", "reconnect_max", "healthy_after", "autostart"} & set(TUNNEL_KEYS)


PROBE = '''    "probe_interval": Key(float, 2.5, between(1, 9), "seconds between probes (a test key)"),
'''


def test_a_link_key_added_in_one_place_reaches_both_roles(tmp_path):
    """One entry in keys.LINK_KEYS: both settings types get the field, both roles'
    SCHEMA the key, config accepts it, the device restarts its tunnel for it and the
    server hands it to new uplinks. (A copy of the package with the entry added.)"""
    import shutil
    shutil.copytree(os.path.join(ROOT, "tcprc"), str(tmp_path / "tcprc"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    keys = tmp_path / "tcprc" / "keys.py"
    text = keys.read_text()
    anchor = "LINK_KEYS: Dict[str, Key] = {\n"
    assert text.count(anchor) == 1
    keys.write_text(text.replace(anchor, anchor + PROBE))
    code = "\n".join((
        "from tcprc.settings import DeviceSettings, ServerSettings",
        "from tcprc.ops.config import SCHEMA, build_config",
        "from tcprc.device.app import TUNNEL_KEYS",
        "from tcprc.keys import NEW, SESSION",
        "assert 'probe_interval' in DeviceSettings._fields and 'probe_interval' in ServerSettings._fields",
        "assert SCHEMA['device']['device']['probe_interval'].applies == SESSION",
        "assert SCHEMA['server']['server']['probe_interval'].applies == NEW",
        "assert 'probe_interval' in TUNNEL_KEYS",
        "assert build_config('device', {}, 't').device.probe_interval == 2.5",
        "cfg = build_config('server', {'server': {'probe_interval': 4}}, 't')",
        "assert cfg.server.probe_interval == 4.0",
        "try:",
        "    build_config('device', {'device': {'probe_interval': 10}}, 't')",
        "except Exception as exc:",
        "    assert 'probe_interval must be between 1 and 9' in str(exc), exc",
        "else:",
        "    raise AssertionError('accepted')",
        "print('ok')"))
    result = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path), capture_output=True,
                            text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(tmp_path)))
    assert result.stdout == "ok\n", result.stderr
