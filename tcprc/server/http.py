"""[server] http: the fleet's status page (/), /api/devices (JSON) and /metrics
(Prometheus text format), served by the standard library in daemon threads.

No authentication: it shows ids, addresses and errors (never secrets), so it
belongs on loopback; another address gets a warning at start.  Everything
from the table is escaped: the page builds its rows with textContent, the
metrics escape label values.
"""

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Dict, List

from ..addr import format_hostport, parse_hostport

log = logging.getLogger("tcprc.server")

_LOOPBACK = ("127.", "::1", "localhost")

# (name, type, help, the row's key): one sample per device and metric.
_METRICS = (
    ("tcprc_session_up", "gauge", "1 while the device's session is up", "up"),
    ("tcprc_open_streams", "gauge", "client streams open on the device's session", "streams"),
    ("tcprc_bytes_from_device_total", "counter", "bytes received from the device",
     "bytes_up"),
    ("tcprc_bytes_to_device_total", "counter", "bytes sent to the device", "bytes_down"),
    ("tcprc_sessions_started_total", "counter", "sessions the device started", "sessions"),
    ("tcprc_auth_failures_total", "counter", "failed authentications as the device",
     "auth_failures"),
    ("tcprc_refused_clients_total", "counter", "clients refused by the device's limits",
     "refused_clients"),
    ("tcprc_heartbeat_rtt_seconds", "gauge", "smoothed heartbeat round trip of the session",
     "rtt"),
)


def label(value: str) -> str:
    """A Prometheus label value: backslash, quote and newline escaped."""
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def metrics_text(rows: List[Dict[str, Any]], auth_failures: int) -> str:
    lines = []
    for name, kind, text, key in _METRICS:
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for row in rows:
            value = 1 if key == "up" and row["state"] == "up" else row.get(key, 0)
            if value is None:
                continue   # no RTT known: no sample
            lines.append("%s{device=\"%s\"} %s" % (name, label(row["id"]), _number(value)))
    lines += ["# HELP tcprc_server_auth_failures_total failed authentications from any source",
              "# TYPE tcprc_server_auth_failures_total counter",
              "tcprc_server_auth_failures_total %d" % auth_failures]
    return "\n".join(lines) + "\n"


def _number(value: Any) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tcprc fleet</title>
<style>
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.3em;margin:0 0 .3em}
#summary{color:#555;margin-bottom:.8em}
table{border-collapse:collapse;background:#fff;box-shadow:0 1px 3px #0002}
th,td{padding:.35em .8em;border-bottom:1px solid #e4e4e4;text-align:left;white-space:nowrap}
th{background:#f0f0f0;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.err{white-space:normal;max-width:32em;color:#a33}
.up{color:#16803c;font-weight:600}.down{color:#b42318;font-weight:600}
</style></head><body>
<h1>tcprc fleet</h1>
<div id="summary">loading&hellip;</div>
<noscript>This page refreshes with JavaScript; the table is at /api/devices.</noscript>
<table id="devices"><thead><tr><th>device</th><th>state</th><th>source</th><th>since</th>
<th>streams</th><th>bytes up</th><th>bytes down</th><th>rtt</th><th>sessions</th>
<th>auth failures</th><th>last error</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
function size(n){var u=["B","KB","MB","GB","TB"],i=0;while(n>=1000&&i<4){n/=1000;i++;}
 return i?n.toFixed(1)+" "+u[i]:n+" B";}
function cell(tr,text,cls){var td=document.createElement("td");td.textContent=text;
 if(cls)td.className=cls;tr.appendChild(td);}
function show(rows){
 var body=document.querySelector("#devices tbody");body.textContent="";
 var up=0;
 rows.forEach(function(r){
  var tr=document.createElement("tr");tr.dataset.device=r.id;
  if(r.state==="up")up++;
  cell(tr,r.id);cell(tr,r.state,r.state);cell(tr,r.source||"-");
  cell(tr,r.since?new Date(r.since*1000).toISOString().replace("T"," ").slice(0,19):"-");
  cell(tr,r.streams,"num");cell(tr,size(r.bytes_up),"num");cell(tr,size(r.bytes_down),"num");
  cell(tr,r.rtt==null?"-":(r.rtt*1000).toFixed(1)+" ms","num");cell(tr,r.sessions,"num");
  cell(tr,r.auth_failures,"num");cell(tr,r.last_error||"-","err");
  body.appendChild(tr);});
 document.getElementById("summary").textContent=rows.length+" device(s), "+up+
  " up; updated "+new Date().toISOString().slice(11,19)+" UTC";}
function refresh(){fetch("api/devices",{cache:"no-store"}).then(function(r){return r.json();})
 .then(show).catch(function(e){document.getElementById("summary").textContent=
 "cannot reach the server: "+e;});}
refresh();setInterval(refresh,2000);
</script></body></html>
"""


class _Handler(BaseHTTPRequestHandler):
    server_version = "tcprc"
    timeout = 10   # a client that stalls mid-request frees its thread

    def do_GET(self) -> None:
        app = self.server.app   # type: ignore[attr-defined]
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = metrics_text(app.devices(), app.auth_failures).encode()
            self._send(200, "text/plain; version=0.0.4; charset=utf-8", body)
        elif path == "/api/devices":
            self._send(200, "application/json", json.dumps(app.devices()).encode())
        elif path in ("/", "/index.html"):
            self._send(200, "text/html; charset=utf-8", PAGE.encode())
        else:
            self._send(404, "text/plain; charset=utf-8", b"not found\n")

    def _send(self, code: int, kind: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy",
                         "default-src 'none'; script-src 'unsafe-inline'; "
                         "style-src 'unsafe-inline'; connect-src 'self'")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s: %s", self.address_string(), format % args)


class _Server6(ThreadingHTTPServer):
    import socket
    address_family = socket.AF_INET6


class StatusServer:
    """The HTTP listener of [server] http, in a daemon thread; OSError at bind."""

    def __init__(self, app: Any, address: str):
        host, port = parse_hostport(address, allow_empty_host=True, allow_zero_port=True)
        server_class = _Server6 if ":" in host else ThreadingHTTPServer
        self._httpd = server_class((host or "0.0.0.0", port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.app = app   # type: ignore[attr-defined]
        self.address = self._httpd.server_address[:2]
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.5,),
                                        name="tcprc-http", daemon=True)
        self._thread.start()
        where = format_hostport(*self.address)
        log.info("status page on http://%s/ (metrics on /metrics)", where)
        if not host or not host.startswith(_LOOPBACK):
            log.warning("[server] http %s is not a loopback address: the status page has no "
                        "authentication and shows every device's id, address and errors to "
                        "whoever reaches it", address)

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5)
