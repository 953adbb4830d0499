"""Config files read in process: errors, defaults, the samples, value types."""

import os
import re

import pytest

from support import ROOT
from tcprc.ops.config import OPTIONAL_SECTIONS, SCHEMA, ConfigError, load_config


def write(path, text):
    path.write_text(text)
    return str(path)


def test_config_directory_and_binary_file_are_reported(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(str(tmp_path), "device")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="bin.toml: "):
        load_config(str(binary), "device")


def test_empty_file_means_defaults(tmp_path):
    cfg = load_config(write(tmp_path / "empty.toml", ""), "device")
    assert cfg.device.local == "127.0.0.1:23" and cfg.device.server == ()
    assert cfg.device.reconnect_min == 1.0 and cfg.device.reconnect_max == 60.0
    cfg = load_config(write(tmp_path / "empty2.toml", ""), "server")
    assert cfg.server.takeover is True and cfg.server.host == "127.0.0.1:2222"


@pytest.mark.parametrize("role, sample", [("device", "etc/tcprc.toml"), ("server", "etc/tcprc-server.toml")])
def test_samples_are_valid_and_document_every_key(role, sample):
    path = os.path.join(ROOT, sample)
    load_config(path, role)
    text = open(path).read()
    for section, keys in SCHEMA[role].items():
        assert "[%s]" % section in text
        for key, spec in keys.items():
            if spec.type is dict:      # sub-tables: an example, commented out
                assert "# [%s.%s." % (section, key) in text, (sample, section, key)
                continue
            # A key whose default depends on others is shown commented out, and
            # so is every key of a table whose absence means "off".
            commented = spec.default is None or section in OPTIONAL_SECTIONS
            line = r"# %s = " if commented else r"%s = "
            assert re.search(r"^#.*\n" + line % key, text, re.M), "%s: %s.%s undocumented" % (sample, section, key)


def test_integer_values_are_accepted_for_seconds(tmp_path):
    cfg = load_config(write(tmp_path / "c.toml", "[device]\nconnect_timeout = 3\n"), "device")
    assert cfg.device.connect_timeout == 3.0 and isinstance(cfg.device.connect_timeout, float)


def test_samples_name_the_paths_the_readme_uses_and_every_device_table_key():
    from tcprc.ops.config import _DEVICE_TABLE_KEYS
    readme = open(os.path.join(ROOT, "README.md")).read()
    for sample, installed in (("etc/tcprc.toml", "/etc/tcprc/tcprc.toml"),
                              ("etc/tcprc-server.toml", "/etc/tcprc/tcprc-server.toml")):
        first = open(os.path.join(ROOT, sample)).readline()
        assert "-c %s)" % installed in first, first
        assert installed in readme
    server = open(os.path.join(ROOT, "etc/tcprc-server.toml")).read()
    for key in _DEVICE_TABLE_KEYS:
        if key != "services":
            assert re.search(r"^# %s = " % key, server, re.M), key
