"""The goals of issues 5, 11, 12 and 23, checked against a run."""

from typing import Any, Dict, List, Optional


def targets(results: Dict[str, Dict[str, Any]], streams: int) -> List[Dict[str, Any]]:
    """The goals of issues 5, 11, 12 and 23, checked against this run ("tcprc" is v2)."""
    t = results.get("tcprc") or {}
    ssh, socat, direct, legacy = (results.get(n) or {} for n in ("ssh", "socat", "direct", "tcprc-legacy"))
    checks = []

    def ratio(name: str, key: str, base: Dict[str, Any], limit: float, higher: bool,
              subject: Optional[Dict[str, Any]] = None) -> None:
        a = t if subject is None else subject
        if key in a and key in base and base[key]:
            value = a[key] / base[key]
            checks.append({"target": name, "value": round(value, 3), "limit": limit,
                           "ok": value >= limit if higher else value <= limit})

    def absolute(name: str, value: Optional[float], limit: float, higher: bool = False) -> None:
        if value is not None:
            checks.append({"target": name, "value": round(value, 3 if higher else 1), "limit": limit,
                           "ok": value >= limit if higher else value <= limit})

    ratio("1 stream >= 2.5x ssh -R", "tput_1_gbps", ssh, 2.5, True)
    ratio("1 stream >= 1.2x socat", "tput_1_gbps", socat, 1.2, True)
    ratio("4 streams >= 2.5x ssh -R", "tput_4_gbps", ssh, 2.5, True)
    ratio("latency p50 <= 1.0x ssh -R", "latency_p50_us", ssh, 1.0, False)
    ratio("connections/s >= 1.0x ssh -R", "conn_per_s", ssh, 1.0, True)
    if "device_rss_idle_kb" in t:
        # Issue 23 (a 64 MB gateway) tightened issue 5's 15 MB and 32 KB.
        absolute("device RSS idle <= 14 MB (KB)", t["device_rss_idle_kb"], 14 * 1024)
        absolute("RSS per open stream <= 20 KB", t["device_rss_per_stream_kb"], 20)
        absolute("threads after close - idle <= 0", t["device_threads_after"] - t["device_threads_idle"], 0)
        absolute("RSS after close - idle <= 1 MB (KB)", t["device_rss_after_kb"] - t["device_rss_idle_kb"], 1024)
        absolute("RSS growth in a 2nd round <= 256 KB (KB)",
                 t["device_rss_after2_kb"] - t["device_rss_after_kb"], 256)
    ratio("stretch: 1 stream >= 40% of direct", "tput_1_gbps", direct, 0.4, True)
    # Issue 11: v2 costs little against legacy, and a paused client stops only itself.
    ratio("v2: 1 stream >= 0.9x legacy", "tput_1_gbps", legacy, 0.9, True)
    ratio("v2: 4 streams >= 0.9x legacy", "tput_4_gbps", legacy, 0.9, True)
    ratio("v2: latency p50 <= 1.05x legacy", "latency_p50_us", legacy, 1.05, False)
    absolute("v2: 4 streams, 5th paused >= 0.8x not", t.get("paused_ratio"), 0.8, higher=True)
    # Issue 12: TLS against ssh -R, which encrypts too.
    tls = results.get("tcprc-tls") or {}
    ratio("TLS: 1 stream >= 1.5x ssh -R", "tput_1_gbps", ssh, 1.5, True, tls)
    ratio("TLS: 4 streams >= 1.5x ssh -R", "tput_4_gbps", ssh, 1.5, True, tls)
    ratio("TLS: device CPU per GB < 1.0x ssh -R", "device_cpu_s_per_gb", ssh, 1.0, False, tls)
    ratio("TLS: latency p50 <= 1.1x ssh -R", "latency_p50_us", ssh, 1.1, False, tls)
    # Issue 23: with an id and a secret, as a fleet runs them.  (Issue 12 asked
    # for TLS within 3 MB of a plain device with an id while the id's HMAC
    # loaded libcrypto too; it no longer does, so all of OpenSSL shows in
    # that difference, and the absolute limits below replace it.)
    absolute("device RSS idle with an id <= 16 MB (KB)", t.get("device_rss_idle_id_kb"), 16 * 1024)
    absolute("TLS: device RSS idle with an id <= 19 MB (KB)", tls.get("device_rss_idle_id_kb"), 19 * 1024)
    ratio("TLS: 1 stream >= 0.6x plain v2", "tput_1_gbps", t, 0.6, True, tls)
    return checks
