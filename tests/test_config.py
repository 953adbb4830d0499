"""Config files read in process: errors, defaults, the samples, value types."""

import os
import re

import pytest

from support import ROOT
from support.fresh import python_output
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


def _comment_above(lines, index):
    """The comment lines right above lines[index], as one line of text (up to a blank
    line, a key or a table header, commented out or not)."""
    found = []
    for line in reversed(lines[:index]):
        if not line.startswith("#") or re.match(r"^# ?(\[[^] ]+\]$|[a-z_]+ = )", line):
            break
        found.insert(0, line.lstrip("#").strip())
    return " ".join(found)


def _line_of(lines, pattern):
    index = [i for i, line in enumerate(lines) if re.match(pattern, line)]
    assert index, pattern
    return index[0]


@pytest.mark.parametrize("role, sample", [("device", "etc/tcprc.toml"), ("server", "etc/tcprc-server.toml")])
def test_samples_say_when_each_key_applies(role, sample):
    """The comment of each key says "(applies at once)", "(restarts the tunnel)", ...
    as its schema flag has it; a table whose keys all apply alike says it above the
    table. So the samples cannot drift from what the agents do (changes.note)."""
    from tcprc.ops.changes import note
    from tcprc.ops.config import DEVICE_TABLE_KEYS
    lines = open(os.path.join(ROOT, sample)).read().splitlines()
    for section, keys in SCHEMA[role].items():
        header = _comment_above(lines, _line_of(lines, r"^(# )?\[%s\]$" % section))
        for key, spec in keys.items():
            wanted = "(" + note(role, spec.applies)
            if spec.type is dict:   # sub-tables: above the first example
                comment = _comment_above(lines, _line_of(lines, r"^# \[%s\.%s\.[^]]+\]$"
                                                         % (section, key)))
            else:
                comment = _comment_above(lines, _key_line(lines, section, key))
            alike = {other.applies for other in keys.values()} == {spec.applies}
            assert wanted in comment or (alike and wanted in header), \
                "%s: %s.%s: no %r in %r" % (sample, section, key, wanted + ")", comment)
    if role == "server":   # the [server.devices.ID] tables: each flag their keys have
        comment = _comment_above(lines, _line_of(lines, r"^# \[server\.devices\.gw1\]$"))
        for applies in set(DEVICE_TABLE_KEYS.values()):
            assert "(" + note(role, applies) in comment, (applies, comment)


def _key_line(lines, section, key):
    """The line of `key` in [section] (commented out or not): sections share key names."""
    start = _line_of(lines, r"^(# )?\[%s\]$" % section)
    return start + 1 + _line_of(lines[start + 1:], r"^(# )?%s = " % key)


def test_integer_values_are_accepted_for_seconds(tmp_path):
    cfg = load_config(write(tmp_path / "c.toml", "[device]\nconnect_timeout = 3\n"), "device")
    assert cfg.device.connect_timeout == 3.0 and isinstance(cfg.device.connect_timeout, float)


def test_samples_name_the_paths_the_readme_uses_and_every_device_table_key():
    from tcprc.ops.config import DEVICE_TABLE_KEYS
    readme = open(os.path.join(ROOT, "README.md")).read()
    for sample, installed in (("etc/tcprc.toml", "/etc/tcprc/tcprc.toml"),
                              ("etc/tcprc-server.toml", "/etc/tcprc/tcprc-server.toml")):
        first = open(os.path.join(ROOT, sample)).readline()
        assert "-c %s)" % installed in first, first
        assert installed in readme
    server = open(os.path.join(ROOT, "etc/tcprc-server.toml")).read()
    for key in DEVICE_TABLE_KEYS:
        if key != "services":
            assert re.search(r"^# %s = " % key, server, re.M), key


def test_the_toml_reader_import_leaves_typing_as_it_was():
    # ops.tomlread imports tomllib with typing keeping string annotations as they
    # are (no compile(): docs/benchmarks.md, "Third round"); afterwards typing is
    # the same, and the reader reads. A fresh interpreter: pytest may hold tomllib.
    code = ("import typing; before = typing._type_check\n"
            "from tcprc.ops.tomlread import tomllib\n"
            "class T(typing.NamedTuple):\n"
            "    x: 'int'\n"
            "print(typing._type_check is before, type(T.__annotations__['x']).__name__,"
            " tomllib.loads('a = [1, 2]'))\n")
    assert python_output(code).split(None, 2) == ["True", "ForwardRef", "{'a': [1, 2]}\n"]
