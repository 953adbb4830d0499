"""[server] http (issues 19 and 20): limits of a request, a bounded number of them,
hang-ups without tracebacks, the Host check, the token, and the status page
starting, moving and stopping live; over real sockets, with real ServerApps."""

import base64
import json
import logging
import signal
import socket
import struct
import subprocess
import sys
import threading

import pytest

from support import ROOT
from support.agents import tcprc_command
from support.net import free_port, port_accepts, recv_until_eof
from support.tunnel import settings, start_server
from support.waiting import wait_for
from tcprc.errors import ConfigError
from tcprc.ops.commands import CommandParser, masked
from tcprc.ops.config import build_config, load_config
from tcprc.server import http

TOKEN = "status-page-token-0123456789abcdef"


def ask(address, head, source="127.0.0.1", timeout=10.0):
    """Send a raw request head; the whole answer (until the server closes)."""
    with socket.create_connection(address, timeout=timeout, source_address=(source, 0)) as conn:
        conn.sendall(head)
        return recv_until_eof(conn)


def get(app, path="/", host=None, headers=(), version="HTTP/1.1", method="GET"):
    """(status, headers, body) of one request to `app`'s status page."""
    where = "%s:%d" % app.http_address
    lines = ["%s %s %s" % (method, path, version)]
    if host is not False:
        lines.append("Host: %s" % (host or where))
    lines += list(headers)
    answer = ask(app.http_address, ("\r\n".join(lines) + "\r\n\r\n").encode())
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    found = {}
    for field in fields:
        name, _, value = field.partition(":")
        found[name.lower()] = value.strip()
    return int(status_line.split()[1]), found, body


def status_of(answer):
    return int(answer.split(b" ", 2)[1]) if answer.startswith(b"HTTP/1.") else None


@pytest.fixture
def page():
    app = start_server(http="127.0.0.1:0")
    yield app
    app.close()


def lines_about(caplog, text, level=logging.INFO):
    return [r.getMessage() for r in caplog.records
            if text in r.getMessage() and r.levelno >= level]


# ---- A. limits of one request ----------------------------------------------------------------

def test_a_header_line_over_8_kb_is_answered_431_and_closed(page):
    with socket.create_connection(page.http_address, timeout=10) as conn:
        # no end of the head: the old reader took up to 64 KB a line, then waited
        conn.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 9000)
        answer = recv_until_eof(conn)
    assert status_of(answer) == 431


def test_more_than_64_header_lines_are_431(page):
    where = ("%s:%d" % page.http_address).encode()
    head = b"GET / HTTP/1.1\r\nHost: " + where + b"\r\n" + \
        b"".join(b"X-%d: y\r\n" % i for i in range(64)) + b"\r\n"
    assert status_of(ask(page.http_address, head)) == 431
    fits = b"GET / HTTP/1.1\r\nHost: " + where + b"\r\n" + \
        b"".join(b"X-%d: y\r\n" % i for i in range(63)) + b"\r\n"
    assert status_of(ask(page.http_address, fits)) == 200


def test_a_head_over_32_kb_in_all_is_431(page):
    where = ("%s:%d" % page.http_address).encode()
    head = b"GET / HTTP/1.1\r\nHost: " + where + b"\r\n" + \
        b"".join(b"X-%d: %s\r\n" % (i, b"z" * 5000) for i in range(7)) + b"\r\n"
    assert status_of(ask(page.http_address, head)) == 431
    assert status_of(ask(page.http_address, b"GET /" + b"p" * 9000 + b" HTTP/1.1\r\n\r\n")) == 414


def test_the_whole_head_has_one_deadline(page, monkeypatch, caplog):
    """A client dripping a byte at a time gets no more than head_timeout in all
    (a timeout per recv alone would wait for it forever)."""
    monkeypatch.setattr(http.StatusServer, "head_timeout", 1.0, raising=False)
    drip = b"GET / HTTP/1.1\r\nX-Slow: " + b"s" * 100
    with socket.create_connection(page.http_address, timeout=10) as conn:
        for byte in drip:   # 12 s of dripping at most, one byte every 0.1 s
            try:
                conn.sendall(bytes([byte]))
                conn.settimeout(0.1)
                answer = conn.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                answer = b""
            break
        else:
            pytest.fail("the server still waited for the head after 12 s of dripping")
    assert answer == b"" or status_of(answer) == 408
    assert lines_about(caplog, "refused (408): the request head took too long",
                       logging.WARNING)
    caplog.clear()
    with socket.create_connection(page.http_address, timeout=10) as idle:   # a preconnect
        assert recv_until_eof(idle) == b""   # closed without a word
    assert not lines_about(caplog, "status page:", logging.INFO)


def test_a_malformed_request_is_400_and_the_page_serves_on(page):
    assert status_of(ask(page.http_address, b"GARBAGE\r\n\r\n")) == 400
    assert status_of(ask(page.http_address, b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")) == 400
    assert status_of(ask(page.http_address, b"GET / HTTP/2.0\r\n\r\n")) == 505
    assert get(page, method="POST")[0] == 405
    assert get(page)[0] == 200


# ---- A. concurrent requests, in all and per source ----------------------------------------------

def _stall(address, source):
    """A connection that sends half a head and waits (it holds one slot)."""
    conn = socket.create_connection(address, timeout=10, source_address=(source, 0))
    conn.sendall(b"GET / HTTP/1.1\r\n")
    return conn


def test_one_source_cannot_take_every_slot_and_over_the_limit_is_503(page, monkeypatch, caplog):
    monkeypatch.setattr(http.StatusServer, "max_per_source", 3, raising=False)
    monkeypatch.setattr(http.StatusServer, "max_requests", 5, raising=False)
    ok = ("GET /api/devices HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % page.http_address).encode()
    held = [_stall(page.http_address, "127.0.0.1") for _ in range(3)]
    try:   # accepted in order: once the 4th is refused, the 3 have their threads
        assert status_of(ask(page.http_address, ok, "127.0.0.1")) == 503
        threads = threading.active_count()
        for _ in range(20):   # over its share: 503 at once, no thread started for it
            assert status_of(ask(page.http_address, ok, "127.0.0.1")) == 503
        assert threading.active_count() <= threads
        assert status_of(ask(page.http_address, ok, "127.0.0.2")) == 200   # others still served
        # its thread gives the slot back just after the answer was read: wait for that
        wait_for(lambda: page._http._httpd._active == 3, what="the served request's slot back")
        held += [_stall(page.http_address, "127.0.0.2") for _ in range(2)]
        assert status_of(ask(page.http_address, ok, "127.0.0.3")) == 503   # all 5 slots taken
        assert lines_about(caplog, "answered 503", logging.WARNING)
        assert len(lines_about(caplog, "answered 503")) <= 12   # rate-limited per source
    finally:
        for conn in held:
            conn.close()
    wait_for(lambda: status_of(ask(page.http_address, ok, "127.0.0.3")) == 200,
             what="the slots free again once the stalled clients left")


def test_a_client_that_hangs_up_costs_no_traceback(capfd, caplog):
    devices = {"d%03d" % i: {"secret": TOKEN, "host": "127.0.0.1:%d" % (31000 + i)}
               for i in range(300)}   # an answer of ~100 KB: the send meets the reset
    app = start_server(http="127.0.0.1:0", devices=devices)
    try:
        request = ("GET /api/devices HTTP/1.1\r\nHost: %s:%d\r\n\r\n" % app.http_address).encode()
        for i in range(60):
            conn = socket.create_connection(app.http_address, timeout=10)
            if i % 2:
                conn.sendall(request)
            else:   # half a head, then gone
                conn.sendall(request[:20])
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()   # a reset
        status, _, body = get(app, "/api/devices")
        assert status == 200 and len(json.loads(body)) == 300
    finally:
        app.close()
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Exception occurred" not in err
    assert not [r for r in caplog.records if r.exc_info]
    assert not lines_about(caplog, "status page:", logging.INFO)   # hang-ups: debug at most


# ---- A. the Host header (DNS rebinding) -------------------------------------------------------

def test_only_this_server_s_own_names_are_answered(page, caplog):
    port = page.http_address[1]
    assert get(page, host="127.0.0.1:%d" % port)[0] == 200
    assert get(page, host="localhost:%d" % port)[0] == 200
    assert get(page, host="LOCALHOST.:%d" % port)[0] == 200
    # a page of evil.example whose name now resolves to 127.0.0.1 (DNS rebinding)
    status, _, body = get(page, "/api/devices", host="evil.example:%d" % port)
    assert status == 421 and b"[" not in body
    assert get(page, host="127.0.0.1:%d" % (port + 1))[0] == 421   # another port: another site
    assert get(page, host="127.0.0.1")[0] == 421                    # port 80
    lines = lines_about(caplog, "for host 'evil.example:%d' refused" % port, logging.WARNING)
    assert len(lines) == 1 and "http_hosts" in lines[0]
    assert get(page, host=False)[0] == 400                            # HTTP/1.1 needs one
    assert get(page, host=False, version="HTTP/1.0")[0] == 200        # an old client


def test_http_hosts_adds_names_with_or_without_a_port():
    app = start_server(http="127.0.0.1:0", http_hosts=["status.example", "fleet.example:8443",
                                                       "[::1]"])
    try:
        assert get(app, host="status.example:1234")[0] == 200
        assert get(app, host="STATUS.example")[0] == 200
        assert get(app, host="fleet.example:8443")[0] == 200
        assert get(app, host="fleet.example:80")[0] == 421
        assert get(app, host="fleet.example")[0] == 421
        assert get(app, host="[::1]:9")[0] == 200
        assert get(app, host="other.example")[0] == 421
    finally:
        app.close()


def test_http_hosts_entries_are_checked():
    for bad, problem in (("a b", "not a host name"), ("::1", "in brackets"),
                         ("x:99999", "out of range"), ("x/y", "not a host name")):
        with pytest.raises(ConfigError) as caught:
            build_config("server", {"server": {"http_hosts": [bad]}}, "t.toml")
        assert str(caught.value).startswith("t.toml: [server] http_hosts ") and problem in \
            str(caught.value), str(caught.value)


# ---- B. the token -------------------------------------------------------------------------------

def _basic(user, password):
    return "Authorization: Basic " + base64.b64encode(("%s:%s" % (user, password)).encode()).decode()


def test_a_token_guards_the_page_the_api_and_the_metrics(caplog):
    app = start_server(http="127.0.0.1:0", http_token=TOKEN)
    try:
        for path in ("/", "/api/devices", "/metrics", "/nothing"):
            status, fields, body = get(app, path)
            assert status == 401 and fields["www-authenticate"].startswith("Basic realm=")
            assert b"device" not in body
        assert not lines_about(caplog, "wrong credentials")   # asking first is no offence
        bearer = "Authorization: Bearer " + TOKEN
        assert get(app, "/api/devices", headers=[bearer])[0] == 200
        assert get(app, "/metrics", headers=[bearer])[0] == 200
        status, _, body = get(app, "/", headers=[_basic("anyone", TOKEN)])   # a browser's login
        assert status == 200 and b"No authentication" not in body
        wrong = "a-wrong-guess-of-the-token-0123456789"
        for header in ("Authorization: Bearer " + wrong, _basic("x", wrong),
                       "Authorization: Basic !!!", "Authorization: Digest " + TOKEN,
                       "Authorization: Bearer " + TOKEN[:-1]):
            assert get(app, "/api/devices", headers=[header])[0] == 401
        assert lines_about(caplog, "wrong credentials", logging.WARNING)
        assert TOKEN not in caplog.text and wrong not in caplog.text
    finally:
        app.close()


def test_metrics_open_serves_only_the_metrics_without_the_token():
    app = start_server(http="127.0.0.1:0", http_token=TOKEN, http_metrics_open=True)
    try:
        status, fields, body = get(app, "/metrics")
        assert status == 200 and fields["content-type"].startswith("text/plain; version=0.0.4")
        assert get(app, "/api/devices")[0] == 401 and get(app, "/")[0] == 401
    finally:
        app.close()


def test_without_a_token_the_page_says_so_on_itself(page):
    status, fields, body = get(page, "/")
    assert status == 200 and b"No authentication" in body and b"http_token" in body
    csp = fields["content-security-policy"]
    assert "'unsafe-inline'" not in csp and "script-src 'sha256-" in csp
    assert "frame-ancestors 'none'" in csp and fields["x-frame-options"] == "DENY"


def test_the_token_is_a_secret_of_the_configuration(tmp_path, caplog):
    token_file = tmp_path / "http.token"
    token_file.write_text(TOKEN + "\n")
    config = tmp_path / "server.toml"
    config.write_text("[server]\nhttp = \"127.0.0.1:0\"\nhttp_token_file = \"http.token\"\n")
    cfg = load_config(str(config), "server")   # relative to the config file
    assert cfg.server.http_token.reveal() == TOKEN.encode() and TOKEN not in repr(cfg.server)
    parser = CommandParser(None, cfg)
    assert parser.execute("config get server.http_token") == ["server.http_token = <hidden>",
                                                              "OK"]
    assert TOKEN not in "\n".join(parser.execute("config get server"))
    for table, problem, never in (
            ({"http_token": "too-short"}, "http_token is shorter than 128 bits", "too-short"),
            ({"http_token": 7777}, "http_token must be a string", "7777"),
            ({"http_token": TOKEN, "http_token_file": str(token_file)},
             "http_token and http_token_file are exclusive", TOKEN),
            ({"http_token_file": str(tmp_path / "none")},
             "http_token_file %s: no such file" % (tmp_path / "none"), TOKEN)):
        with pytest.raises(ConfigError) as caught:
            build_config("server", {"server": table}, "t.toml")
        assert str(caught.value).startswith("t.toml: [server] ") and problem in str(caught.value)
        assert never not in str(caught.value)
    assert masked("config set server.http_token %s" % TOKEN) == \
        "config set server.http_token <hidden>"


def test_a_token_set_live_applies_to_the_next_request(page, caplog):
    cfg = build_config("server", {"server": {"listen": "127.0.0.1:0", "host": "127.0.0.1:0",
                                             "http": "127.0.0.1:0"}}, "test")
    page.settings = cfg.server   # the parser's config is what the app runs
    parser = CommandParser(page, cfg)
    assert get(page, "/api/devices")[0] == 200
    assert parser.execute("config set server.http_token %s" % TOKEN) == [
        "server.http_token = <hidden>: applied at once", "OK"]
    assert get(page, "/api/devices")[0] == 401
    assert get(page, "/api/devices", headers=["Authorization: Bearer " + TOKEN])[0] == 200
    assert lines_about(caplog, "http_token set applied")
    assert TOKEN not in caplog.text and "config set server.http_token = <hidden>" in caplog.text
    assert parser.execute("config set server.http_token \"\"")[-1] == "OK"
    assert get(page, "/api/devices")[0] == 200


def test_the_start_warns_when_the_page_is_open_to_others(caplog):
    app = start_server(http="0.0.0.0:0")
    try:
        [line] = lines_about(caplog, "is not a loopback address", logging.WARNING)
        assert "/api/devices" in line and "http_token" in line and "127.0.0.1" in line
    finally:
        app.close()
    caplog.clear()
    app = start_server(http="0.0.0.0:0", http_token=TOKEN)
    try:
        assert not lines_about(caplog, "loopback", logging.WARNING)
        assert lines_about(caplog, "login with http_token")
    finally:
        app.close()


# ---- C. [server] http applies live ---------------------------------------------------------------

def _apply(app, **keys):
    new = settings("server", **dict({"listen": app.settings.listen, "host": app.settings.host},
                                    **keys))
    app.apply_settings(new)


def test_the_status_page_starts_moves_and_stops_live(caplog):
    app = start_server()
    try:
        assert app.http_address is None
        _apply(app, http="127.0.0.1:0")   # SIGHUP after adding [server] http
        assert get(app, "/api/devices")[0] == 200
        first = app.http_address
        assert lines_about(caplog, "status page on http://%s:%d/" % first)
        port = free_port()
        _apply(app, http="127.0.0.1:%d" % port)
        assert app.http_address == ("127.0.0.1", port) and get(app)[0] == 200
        assert not port_accepts(first)
        assert lines_about(caplog, "status page moved from %s:%d to http://127.0.0.1:%d/"
                           % (first + (port,)))
        _apply(app, http="")
        assert app.http_address is None and not port_accepts(("127.0.0.1", port))
        assert lines_about(caplog, "status page on 127.0.0.1:%d stopped" % port)
    finally:
        app.close()


def test_a_new_address_on_the_same_port_replaces_the_old_one():
    port = free_port()
    app = start_server(http="127.0.0.1:%d" % port)
    try:
        _apply(app, http="0.0.0.0:%d" % port)   # cannot be bound while 127.0.0.1:port is
        assert app.http_address == ("0.0.0.0", port)
        assert get(app, host="127.0.0.1:%d" % port)[0] == 200
    finally:
        app.close()


def test_a_busy_new_address_is_one_warning_and_the_old_page_stays(caplog):
    app = start_server(http="127.0.0.1:0")
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        old, port = app.http_address, busy.getsockname()[1]
        caplog.clear()
        _apply(app, http="127.0.0.1:%d" % port, http_token=TOKEN)
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == ["cannot move the status page: the status page ([server] http) "
                            "cannot listen on 127.0.0.1:%d: Address already in use; it stays "
                            "on %s:%d (http_token set applied)" % ((port,) + old)]
        assert app.http_address == old and get(app)[0] == 401   # the old one, the new token
        busy.close()
        _apply(app, http="127.0.0.1:%d" % port, http_token=TOKEN)   # again: now it is free
        assert app.http_address[1] == port
    finally:
        busy.close()
        app.close()


def test_config_set_moves_the_page(page):
    cfg = build_config("server", {"server": {"listen": "127.0.0.1:0", "host": "127.0.0.1:0",
                                             "http": "127.0.0.1:0"}}, "test")
    page.settings = cfg.server
    parser = CommandParser(page, cfg)
    port = free_port()
    assert parser.execute("config set server.http 127.0.0.1:%d" % port) == [
        'server.http = "127.0.0.1:%d": applied at once' % port, "OK"]
    assert page.http_address == ("127.0.0.1", port) and get(page)[0] == 200


def test_a_busy_address_at_start_names_it_and_the_status_page(tmp_path):
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    config = tmp_path / "server.toml"
    config.write_text("[server]\nlisten = \"127.0.0.1:0\"\nhost = \"127.0.0.1:0\"\n"
                      "http = \"127.0.0.1:%d\"\n[control]\nsocket = \"\"\n[log]\ntarget = "
                      "\"stderr\"\n" % port)
    try:
        done = subprocess.run(tcprc_command("server", "-c", str(config)), cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    finally:
        busy.close()
    assert done.returncode == 1
    assert done.stderr.splitlines()[-1] == (
        "tcprc: cannot start the server: the status page ([server] http) cannot listen on "
        "127.0.0.1:%d: Address already in use" % port)


@pytest.mark.skipif(sys.platform != "linux", reason="SIGHUP on a real process")
def test_sighup_adds_the_status_page_to_a_running_server(agents, tmp_path):
    proc = agents.start("server", "--listen", "127.0.0.1:0", "--host", "127.0.0.1:0")
    wait_for(lambda: "server agent running" in agents.log(proc), timeout=30,
             what="the server up")
    port = free_port()
    config = tmp_path / "server-0.toml"
    config.write_text(config.read_text() + "[server]\nhttp = \"127.0.0.1:%d\"\n" % port)
    proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "status page on http://127.0.0.1:%d/" % port in agents.log(proc),
             timeout=30, what="the line of the status page")   # logged once it listens
    assert port_accepts(("127.0.0.1", port))


# ---- B. the page in a real browser -----------------------------------------------------------

ROWS = "document.querySelectorAll('#devices tbody tr').length"
ALL_SHOWN = """new Promise(function (done) {
  var deadline = performance.now() + 30000;
  (function look() {
    if (%s >= %d || performance.now() > deadline) requestAnimationFrame(function () { done(%s); });
    else requestAnimationFrame(look);
  })();
})"""
FIRST_IDS = "Array.from(document.querySelectorAll('#devices tbody tr:not([hidden])'))" \
    ".slice(0, %d).map(function (tr) { return tr.dataset.device; })"
VISIBLE = "document.querySelectorAll('#devices tbody tr:not([hidden])').length"
CLICK = "document.querySelector('#devices th[data-key=%s]').click()"
FILTER = """(function (box) { box.value = %s; box.dispatchEvent(new Event('input')); })(
  document.getElementById('filter'))"""
RED_CELLS = """Array.from(document.querySelectorAll('#devices td')).filter(function (td) {
  return getComputedStyle(td).color === 'rgb(207, 34, 46)'; }).map(function (td) {
  return td.parentNode.dataset.device + ': ' + td.textContent; })"""


def _browser():
    from benchkit.cdp import Browser, find_chromium
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("no Chromium on this machine (apt-get install chromium): the browser "
                    "test of the status page cannot run")
    return Browser(chromium)


@pytest.fixture
def big_fleet(service):
    """1000 configured devices, two of them up (d0005 with a service) and d0007 refused."""
    from support.tunnel import start_device
    devices = {"d%04d" % i: {"secret": TOKEN, "host": "127.0.0.1:%d" % (32000 + i)}
               for i in range(1000)}
    devices["d0005"]["services"] = {"web": {"host": "127.0.0.1:%d" % free_port()}}
    app = start_server(http="127.0.0.1:0", devices=devices)
    apps = [start_device(app, service.address, id="d0005", secret=TOKEN,
                         services={"web": {"local": "%s:%d" % service.address}}),
            start_device(app, service.address, id="d0500", secret=TOKEN)]
    bad = start_device(app, service.address, id="d0007", secret="not-the-secret-of-d0007-at-all",
                       reconnect_min=30, reconnect_max=30)
    rows = lambda: {r["id"]: r for r in app.devices()}   # noqa: E731
    wait_for(lambda: rows()["d0005"]["state"] == rows()["d0500"]["state"] == "up"
             and rows()["d0007"]["auth_failures"], what="two devices up, one refused")
    bad.close()
    yield app
    for device in apps:
        device.close()
    app.close()


def test_a_browser_shows_1000_devices_sorts_and_filters_them(big_fleet):
    """All 1000 rows render; the browser grows by less than 200 MB for them (its
    total RSS over its process tree, against the same browser on about:blank: an
    idle headless Chromium alone sums to ~900 MB of RSS, shared pages counted per
    process); a click sorts, the filter box filters, only a real error is red."""
    browser = _browser()
    try:
        blank = browser.settled_rss_kb()
        browser.call("Page.navigate", url="http://%s:%d/" % big_fleet.http_address)
        assert browser.evaluate(ALL_SHOWN % (ROWS, 1000, ROWS), True) == 1000
        grown = (browser.rss_kb() - blank) / 1024.0
        assert grown < 200, "the browser grew by %.0f MB for 1000 rows" % grown
        assert browser.evaluate(FIRST_IDS % 3) == ["d0000", "d0001", "d0002"]
        browser.evaluate(CLICK % "state")            # down first ...
        browser.evaluate(CLICK % "state")            # ... then up first
        assert sorted(browser.evaluate(FIRST_IDS % 2)) == ["d0005", "d0500"]
        browser.evaluate(CLICK % "id")
        browser.evaluate(CLICK % "id")               # descending
        assert browser.evaluate(FIRST_IDS % 2) == ["d0999", "d0998"]
        browser.evaluate(FILTER % json.dumps("d09"))
        assert browser.evaluate(VISIBLE) == 100
        browser.evaluate(FILTER % json.dumps("UP web="))   # every word, any column
        assert browser.evaluate(FIRST_IDS % 5) == ["d0005"]
        browser.evaluate(FILTER % json.dumps("authentication failed"))
        assert browser.evaluate(FIRST_IDS % 5) == ["d0007"]
        browser.evaluate(FILTER % json.dumps(""))
        assert browser.evaluate(VISIBLE) == 1000
        [red] = browser.evaluate(RED_CELLS)   # the one error; healthy and down rows are not red
        assert red.startswith("d0007: uplink") and "authentication failed" in red
    finally:
        browser.close()


def test_a_browser_logs_in_with_the_token_as_password(service):
    """The 401 makes the browser ask; the token typed as password (any user) opens
    the page, and its refreshes reuse the login.  A login typed into the address
    (http://user:token@host/) works too."""
    devices = {"gw1": {"secret": TOKEN, "host": "127.0.0.1:%d" % free_port()}}
    app = start_server(http="127.0.0.1:0", http_token=TOKEN, devices=devices)
    url = "http://%s:%d/" % app.http_address
    browser = _browser()
    try:
        browser.call("Fetch.enable", handleAuthRequests=True, patterns=[{"urlPattern": "*"}])
        browser.send("Page.navigate", url=url)
        asked, fetched = [], 0
        while fetched < 2:   # the page, then its refreshes of api/devices
            method, params = browser.event("Fetch.requestPaused", "Fetch.authRequired")
            if method == "Fetch.authRequired":   # the login dialog
                asked.append(params["request"]["url"])
                browser.send("Fetch.continueWithAuth", requestId=params["requestId"],
                             authChallengeResponse={"response": "ProvideCredentials",
                                                    "username": "operator", "password": TOKEN})
                continue
            fetched += params["request"]["url"].endswith("/api/devices")
            browser.send("Fetch.continueRequest", requestId=params["requestId"])
        browser.call("Fetch.disable")
        assert asked == [url]   # asked once, for the page: api/devices reused the login
        assert browser.evaluate(ALL_SHOWN % (ROWS, 1, ROWS), True) == 1
        assert "No authentication" not in browser.evaluate("document.body.textContent")
    finally:
        browser.close()
    browser = _browser()
    try:
        browser.call("Page.navigate", url=url.replace("http://", "http://operator:%s@" % TOKEN))
        assert browser.evaluate(ALL_SHOWN % (ROWS, 1, ROWS), True) == 1
        assert browser.evaluate("document.getElementById('summary').textContent").startswith(
            "1 device(s), 0 up, 1 down")
    finally:
        browser.close()
        app.close()
