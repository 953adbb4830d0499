"""The goals of issues 5, 11 and 12, checked against a run."""

from typing import Any, Dict, List, Optional


def targets(results: Dict[str, Dict[str, Any]], streams: int) -> List[Dict[str, Any]]:
    """The goals of issues 5, 11 and 12, checked against this run ("tcprc" is v2)."""
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
        absolute("device RSS idle <= 15 MB (KB)", t["device_rss_idle_kb"], 15 * 1024)
        absolute("RSS per open stream <= 32 KB", t["device_rss_per_stream_kb"], 32)
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
    # Both with an id and a secret, as a fleet runs them: without one, a plain
    # device never loads libcrypto, and the difference is mostly that library.
    if "device_rss_idle_id_kb" in tls and "device_rss_idle_id_kb" in t:
        absolute("TLS: idle RSS - plain v2, both with an id <= 3 MB (KB)",
                 tls["device_rss_idle_id_kb"] - t["device_rss_idle_id_kb"], 3072)
    return checks
