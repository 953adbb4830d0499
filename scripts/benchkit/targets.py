"""The goals of issue 5, checked against a run."""

from typing import Any, Dict, List, Optional


def targets(results: Dict[str, Dict[str, Any]], streams: int) -> List[Dict[str, Any]]:
    """The goals of issue 5, checked against this run."""
    t = results.get("tcprc") or {}
    ssh, socat, direct = (results.get(n) or {} for n in ("ssh", "socat", "direct"))
    checks = []

    def ratio(name: str, key: str, base: Dict[str, Any], limit: float, higher: bool) -> None:
        if key in t and key in base and base[key]:
            value = t[key] / base[key]
            checks.append({"target": name, "value": round(value, 3), "limit": limit,
                           "ok": value >= limit if higher else value <= limit})

    def absolute(name: str, value: Optional[float], limit: float) -> None:
        if value is not None:
            checks.append({"target": name, "value": round(value, 1), "limit": limit,
                           "ok": value <= limit})

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
    return checks
