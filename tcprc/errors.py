"""Error roots: the peer's fault (bad input from the network) apart from ours (config, local)."""
class TcprcError(Exception):
    """Every error tcprc raises on purpose."""
class PeerError(TcprcError):
    """The peer broke the protocol or misbehaved; ends at most its stream or uplink."""
class LocalError(TcprcError):
    """Our side: configuration, local resources, the operator's input."""
