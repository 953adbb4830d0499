"""tcprc: TCP remote connection agent (device side and server side)."""

__version__ = "0.1.0"
