import os
import stat
import sys

import pytest

from tcprc.ops import tomlwrite
from tcprc.ops.config import SCHEMA

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib


TRICKY_STRINGS = [
    "", "plain", 'quote " inside', "back\\slash", "tab\tnew\nline\rcr",
    "bell\x07 esc\x1b del\x7f nul\x00", "unicode é ✓ 🚀", "'single'", "#not a comment",
    "trailing\\", "\u2028 line separator", "[not] = a table",
]


@pytest.mark.parametrize("text", TRICKY_STRINGS)
def test_strings_round_trip(text):
    doc = {"t": {"k": text}}
    assert tomllib.loads(tomlwrite.dumps(doc)) == doc


@pytest.mark.parametrize("value", [
    0, 1, -7, 2 ** 62, True, False, 0.0, 1.0, -2.5, 1e-7, 1e16, 123456789.125,
    [], ["a"], ["127.0.0.1:80", "[::1]:22", 'we"ird'], [1, 2], [[1], ["x"]],
])
def test_values_round_trip(value):
    doc = {"t": {"k": value}}
    assert tomllib.loads(tomlwrite.dumps(doc)) == doc


def test_special_floats():
    back = tomllib.loads(tomlwrite.dumps({"t": {"a": float("inf"), "b": float("-inf"),
                                                  "c": float("nan")}}))["t"]
    assert back["a"] == float("inf") and back["b"] == float("-inf") and back["c"] != back["c"]


def test_every_schema_default_round_trips():
    for role, tables in SCHEMA.items():
        doc = {name: {key: spec.default for key, spec in keys.items()
                      if spec.default is not None}   # None: absent, derived from others
               for name, keys in tables.items()}
        assert tomllib.loads(tomlwrite.dumps(doc)) == doc, role


def test_keys_that_need_quotes():
    doc = {"a b": {"x.y": 1, "ok_key-1": 2, "": 3}}
    assert tomllib.loads(tomlwrite.dumps(doc)) == doc


def test_unsupported_types_are_refused():
    with pytest.raises(TypeError):
        tomlwrite.format_value(object())
    with pytest.raises(TypeError):
        tomlwrite.format_value(None)


def test_sub_tables_round_trip():
    doc = {"server": {"host": "h:1", "devices": {"gw1": {"host": "a:1"}, "gw.2": {"host": "b:2"}}},
           "log": {"level": "info"}}
    text = tomlwrite.dumps(doc)
    assert '[server.devices."gw.2"]' in text
    assert tomllib.loads(text) == doc


SAMPLE = """\
# tcprc device configuration
[device]
# where to dial
server = "10.0.0.1:9000"   # the back office
local = "127.0.0.1:22"

[console]
port = "/dev/ttyS0"
"""


def test_update_keeps_comments_and_other_keys():
    changes = {("device", "server"): "10.9.9.9:9001", ("device", "autostart"): False,
               ("console", "baudrate"): 9600, ("log", "level"): "debug"}
    text = tomlwrite.update_text(SAMPLE, changes)
    assert "# tcprc device configuration" in text and "# where to dial" in text
    doc = tomllib.loads(text)
    assert doc == {
        "device": {"server": "10.9.9.9:9001", "local": "127.0.0.1:22", "autostart": False},
        "console": {"port": "/dev/ttyS0", "baudrate": 9600},
        "log": {"level": "debug"},
    }
    # The new key lands inside its own table, before the next one.
    assert text.index("autostart") < text.index("[console]")


def test_render_falls_back_when_in_place_edit_is_wrong():
    # A multi-line array cannot be edited line by line: render must notice.
    old = '[device]\nallow = [\n  "10.0.0.1:80",\n  "10.0.0.2:80",\n]\n'
    doc = {"device": {"allow": ["10.0.0.3:80"]}}
    text = tomlwrite.render(old, doc, {("device", "allow"): ["10.0.0.3:80"]})
    assert tomllib.loads(text) == doc


def test_render_edits_in_place_when_it_can():
    doc = tomllib.loads(SAMPLE)
    doc["device"]["local"] = "127.0.0.1:23"
    text = tomlwrite.render(SAMPLE, doc, {("device", "local"): "127.0.0.1:23"})
    assert "# the back office" in text and tomllib.loads(text) == doc


def test_atomic_write_replaces_keeps_mode_and_leaves_no_temp(tmp_path):
    path = tmp_path / "tcprc.toml"
    path.write_text("old = 1\n")
    os.chmod(path, 0o640)
    tomlwrite.atomic_write(str(path), "new = 2\n")
    assert path.read_text() == "new = 2\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.listdir(tmp_path) == ["tcprc.toml"]


def test_atomic_write_through_symlink_keeps_the_link(tmp_path):
    real = tmp_path / "real.toml"
    real.write_text("a = 1\n")
    link = tmp_path / "link.toml"
    link.symlink_to(real)
    tomlwrite.atomic_write(str(link), "a = 2\n")
    assert os.path.islink(link) and real.read_text() == "a = 2\n"


def test_atomic_write_failure_leaves_old_file(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("a = 1\n")
    with pytest.raises(TypeError):
        tomlwrite.atomic_write(str(path), 12345)  # not text: the write fails
    assert path.read_text() == "a = 1\n"
    assert os.listdir(tmp_path) == ["c.toml"]


def test_stale_temps_are_found_beside_the_target_of_a_symlinked_config(tmp_path):
    real_dir, link_dir = tmp_path / "real", tmp_path / "etc"
    real_dir.mkdir()
    link_dir.mkdir()
    (real_dir / "gw.toml").write_text("")
    os.symlink(str(real_dir / "gw.toml"), str(link_dir / "tcprc.toml"))
    old = 1000000000
    for path in (real_dir / ".gw.toml.k3j_0q9z.tmp", link_dir / ".tcprc.toml.k3j_0q9z.tmp"):
        path.write_text("half a config")
        os.utime(str(path), (old, old))
    removed, failed = tomlwrite.remove_stale_temps(str(link_dir / "tcprc.toml"))
    # atomic_write writes beside the file the link points to, so that is where to look.
    assert removed == [".gw.toml.k3j_0q9z.tmp"] and failed == []
    assert sorted(os.listdir(str(link_dir))) == [".tcprc.toml.k3j_0q9z.tmp", "tcprc.toml"]
