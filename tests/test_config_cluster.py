"""The [cluster] table of the server's config: absent means no cluster, the
required keys, the secret rules of device secrets, URLs and ranges, the sample."""

import os
import re

import pytest

from support import ROOT
from support.agents import run_tcprc
from tcprc.ops.commands import CommandParser
from tcprc.ops.config import ConfigError, build_config, load_config
from tcprc.settings import ClusterSettings, Secret

HEX = "0123456789abcdef" * 2            # 32 hex digits: exactly 128 bits
SHORT = "s3cr3t-but-far-too-sh"         # 21 characters: too short, must never be printed
GOOD = ('[cluster]\nnode = "s1"\netcd = ["http://127.0.0.1:2379"]\n'
        'peer_listen = "127.0.0.1:9001"\nsecret = "%s"\n' % HEX)


def error_of(tmp_path, text, role="server"):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(str(path), role)
    message = str(info.value)
    assert "\n" not in message and message.startswith(str(path) + ": "), message
    return message[len(str(path)) + 2:]


def test_no_table_no_cluster_and_a_device_has_none(tmp_path):
    assert build_config("server", {}, "t").cluster is None
    assert build_config("server", {"server": {}}, "t").cluster is None
    assert "unknown section [cluster]" in error_of(tmp_path, GOOD, role="device")


def test_a_full_table_and_its_defaults(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(GOOD)
    cluster = load_config(str(path), "server").cluster
    assert isinstance(cluster, ClusterSettings)
    assert (cluster.name, cluster.node, cluster.etcd) == ("tcprc", "s1", ["http://127.0.0.1:2379"])
    assert cluster.peer_advertise == cluster.peer_listen == "127.0.0.1:9001"
    assert cluster.secret == Secret(HEX.encode()) and (cluster.lease_ttl, cluster.client_wait) == (10, 5.0)
    assert HEX not in repr(cluster)


def test_the_secret_file_is_the_config_files_neighbour(tmp_path):
    (tmp_path / "cluster.secret").write_text(HEX + "\n")
    path = tmp_path / "s.toml"
    path.write_text(GOOD.replace('secret = "%s"' % HEX, 'secret_file = "cluster.secret"'))
    cluster = load_config(str(path), "server").cluster
    assert cluster.secret.reveal() == HEX.encode()
    assert cluster.secret_file == str(tmp_path / "cluster.secret")


@pytest.mark.parametrize("change, expected", [
    (('node = "s1"\n', ''), "[cluster] node is required"),
    (('etcd = ["http://127.0.0.1:2379"]\n', ''), "[cluster] etcd is required"),
    (('peer_listen = "127.0.0.1:9001"\n', ''), "[cluster] peer_listen is required"),
    (('secret = "%s"\n' % HEX, ''), "[cluster] needs secret or secret_file"),
    (('node = "s1"', 'node = "s 1"'), "[cluster] node must be 1 to 64 characters"),
    (('[cluster]\n', '[cluster]\nname = ""\n'), "[cluster] name must be 1 to 64 characters"),
    (('http://127.0.0.1:2379', 'https://127.0.0.1:2379'), "https is not supported yet"),
    (('http://127.0.0.1:2379', 'http://127.0.0.1'), "no port"),
    (('http://127.0.0.1:2379', '127.0.0.1:2379'), 'must be "http://ADDR:PORT"'),
    (('["http://127.0.0.1:2379"]', '[2379]'), "every entry must be a string"),
    (('127.0.0.1:9001', '0.0.0.0:9001'), "set peer_advertise"),
    (('127.0.0.1:9001', '127.0.0.1:0'), "port 0 is no port the other servers can dial"),
    (('[cluster]\n', '[cluster]\npeer_advertise = ":9001"\n'), "[cluster] peer_advertise"),
    (('[cluster]\n', '[cluster]\nlease_ttl = 1\n'), "[cluster] lease_ttl must be between 2 and 600"),
    (('[cluster]\n', '[cluster]\nclient_wait = -1\n'), "[cluster] client_wait must be between"),
    (('[cluster]\n', '[cluster]\nsecret_file = "x"\n'), "secret and secret_file are exclusive"),
    (('[cluster]\n', '[cluster]\nwhat = 1\n'), "unknown key 'what' in [cluster]"),
])
def test_bad_tables_are_one_line_naming_the_key(tmp_path, change, expected):
    old, new = change
    assert old in GOOD
    assert expected in error_of(tmp_path, GOOD.replace(old, new, 1))


def test_every_address_needs_an_advertised_one(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(GOOD.replace("127.0.0.1:9001", "0.0.0.0:9001")
                    + 'peer_advertise = "10.0.0.1:9001"\n')
    cluster = load_config(str(path), "server").cluster
    assert (cluster.peer_listen, cluster.peer_advertise) == ("0.0.0.0:9001", "10.0.0.1:9001")


@pytest.mark.e2e
@pytest.mark.parametrize("kind", ["secret", "secret_file"])
def test_a_weak_cluster_secret_exits_2_with_one_line_and_no_secret(tmp_path, kind):
    path = tmp_path / "bad.toml"
    if kind == "secret":
        path.write_text(GOOD.replace(HEX, SHORT))
        expected = "[cluster] secret is shorter than 128 bits"
    else:
        (tmp_path / "weak").write_text(SHORT)
        path.write_text(GOOD.replace('secret = "%s"' % HEX, 'secret_file = "weak"'))
        expected = "[cluster] secret_file %s: the secret in it is shorter" % (tmp_path / "weak")
    result = run_tcprc("server", "-c", str(path))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tcprc: %s: %s" % (path, expected)), result.stderr
    assert SHORT not in result.stderr + result.stdout


def test_the_samples_commented_cluster_table_is_valid_uncommented(tmp_path):
    text = open(os.path.join(ROOT, "etc/tcprc-server.toml")).read()
    block = text[text.index("# [cluster]\n"):text.index("\n\n", text.index("# [cluster]\n"))]
    lines = [line[2:] for line in block.splitlines()]
    # Uncomment the table and its key lines; the explanations stay comments.
    keys = [line for line in lines if line.startswith("[") or re.match(r"^[a-z_]+ = ", line)]
    (tmp_path / "cluster.secret").write_text(HEX)
    keys = [line for line in keys if not line.startswith("secret = ")]
    assert len(keys) == 1 + 9 - 1
    path = tmp_path / "s.toml"
    path.write_text("\n".join(keys).replace("/etc/tcprc/cluster.secret", "cluster.secret") + "\n")
    cluster = load_config(str(path), "server").cluster
    assert cluster.node == "s1" and len(cluster.etcd) == 3 and cluster.peer_advertise == "10.0.0.1:9001"


class _App:
    """What CommandParser needs of an app for `config` commands."""

    def apply_settings(self, settings):
        raise AssertionError("a [cluster] change is not applied live")


def test_config_get_shows_the_table_without_the_secret_and_refuses_an_absent_one(tmp_path):
    path = tmp_path / "s.toml"
    path.write_text(GOOD)
    parser = CommandParser(_App(), load_config(str(path), "server"))
    shown = parser.execute("config get cluster")
    assert shown[-1] == "OK" and 'cluster.node = "s1"' in shown
    assert "cluster.secret = <hidden>" in shown
    assert HEX not in "\n".join(shown)
    assert parser.execute("config set cluster.lease_ttl 4") == [
        "cluster.lease_ttl = 4: needs a restart; the running server keeps 10", "OK"]
    bare = CommandParser(_App(), build_config("server", {}, "t"))
    for line in ("config get cluster", "config get cluster.node", "config set cluster.node s2"):
        answer = bare.execute(line)
        assert len(answer) == 1 and answer[0].startswith("ERROR no [cluster] table"), (line, answer)
