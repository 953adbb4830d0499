"""scripts/tcprc-pki, run under dash (POSIX sh) where it is installed, checked with openssl."""

import hashlib
import os
import ssl
import stat
import subprocess

import pytest

from support.tls import Pki

pytestmark = pytest.mark.skipif(__import__("shutil").which("openssl") is None,
                                reason="the openssl command is missing: tcprc-pki needs it")


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    pki = Pki(str(tmp_path_factory.mktemp("pki")))
    pki.make("ca", pki.path("ca"))
    return pki


def openssl(*args):
    return subprocess.run(["openssl"] + list(args), capture_output=True, text=True, timeout=60)


def verify(pki, cert):
    return openssl("verify", "-CAfile", pki.path("ca/ca.crt"), cert)


def test_ca_key_is_private_and_the_cert_is_a_ca(pki):
    assert stat.S_IMODE(os.stat(pki.path("ca/ca.key")).st_mode) == 0o600
    text = openssl("x509", "-in", pki.path("ca/ca.crt"), "-noout", "-text").stdout
    assert "CA:TRUE" in text and "prime256v1" in text


def test_server_certificate_names_and_chain(pki):
    out = pki.make("server", pki.path("ca"), "tunnel.example", "--ip", "127.0.0.1",
                   "--ip", "::1", "--dns", "alt.example")
    cert = pki.path("ca/tunnel.example.crt")
    assert out.split() == [pki.path("ca/tunnel.example.key"), cert]
    assert stat.S_IMODE(os.stat(pki.path("ca/tunnel.example.key")).st_mode) == 0o600
    assert verify(pki, cert).returncode == 0
    san = openssl("x509", "-in", cert, "-noout", "-ext", "subjectAltName,extendedKeyUsage").stdout
    for name in ("DNS:tunnel.example", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1",
                 "DNS:alt.example", "TLS Web Server Authentication"):
        assert name in san


def test_device_certificate_carries_its_id(pki):
    pki.make("device", pki.path("ca"), "gw-0042.site_a")
    cert = pki.path("ca/gw-0042.site_a.crt")
    assert verify(pki, cert).returncode == 0
    text = openssl("x509", "-in", cert, "-noout", "-subject", "-ext",
                   "subjectAltName,extendedKeyUsage").stdout
    assert "CN = gw-0042.site_a" in text and "DNS:gw-0042.site_a" in text
    assert "TLS Web Client Authentication" in text


def test_pin_is_sha256_of_the_der_certificate(pki):
    pki.make("device", pki.path("ca"), "pinned")
    cert = pki.path("ca/pinned.crt")
    with open(cert) as f:
        der = ssl.PEM_cert_to_DER_cert(f.read())
    assert pki.make("pin", cert).strip() == "sha256:" + hashlib.sha256(der).hexdigest()


def test_expired_and_days(pki):
    pki.make("device", pki.path("ca"), "old", "--expired")
    result = verify(pki, pki.path("ca/old.crt"))
    assert result.returncode != 0 and "certificate has expired" in result.stdout + result.stderr
    pki.make("device", pki.path("ca"), "short", "--days", "2")
    dates = openssl("x509", "-in", pki.path("ca/short.crt"), "-noout", "-startdate", "-enddate").stdout
    assert verify(pki, pki.path("ca/short.crt")).returncode == 0 and "notAfter" in dates


def test_rsa_keys_on_request(pki):
    pki.make("device", pki.path("ca"), "rsa-dev", "--rsa")
    text = openssl("x509", "-in", pki.path("ca/rsa-dev.crt"), "-noout", "-text").stdout
    assert "rsaEncryption" in text and "2048 bit" in text


@pytest.mark.parametrize("args, message", [
    (("device", "{ca}", "bad/id"), "use only A-Z a-z 0-9 . _ -"),
    (("device", "{ca}", "x" * 65), "longer than 64"),
    (("device", "{nowhere}", "dev"), "no CA in"),
    (("server", "{ca}", "s", "--ip", "not-an-ip"), "is not an IP address"),
    (("ca", "{ca}"), "exists: not overwritten"),
    (("pin", "{ca}/ca.key"), "is not a PEM certificate"),
    (("device", "{ca}", "d", "--days", "0"), "--days wants a whole number"),
    (("frobnicate",), "unknown command"),
])
def test_mistakes_are_one_line_and_exit_2(pki, args, message):
    args = [a.format(ca=pki.path("ca"), nowhere=pki.path("nowhere")) for a in args]
    result = pki.run(*args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_an_existing_device_is_never_overwritten_and_a_failure_leaves_no_key(pki):
    pki.make("device", pki.path("ca"), "once")
    with open(pki.path("ca/once.key")) as f:
        key = f.read()
    assert pki.run("device", pki.path("ca"), "once").returncode == 2
    with open(pki.path("ca/once.key")) as f:
        assert f.read() == key
    # A CA whose key is broken: signing fails after the device key was made.
    os.makedirs(pki.path("broken"))
    with open(pki.path("ca/ca.crt")) as src, open(pki.path("broken/ca.crt"), "w") as dst:
        dst.write(src.read())
    with open(pki.path("broken/ca.key"), "w") as f:
        f.write("not a key\n")
    result = pki.run("device", pki.path("broken"), "dev")
    assert result.returncode == 2 and "signing" in result.stderr
    assert sorted(os.listdir(pki.path("broken"))) == ["ca.crt", "ca.key"]


def test_help_names_every_command(pki):
    out = pki.make("help")
    for command in ("ca DIR", "server DIR NAME", "device DIR ID", "pin CERT"):
        assert command in out
