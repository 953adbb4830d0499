"""Every tcprc exception descends from TcprcError, on one of two branches.

PeerError: the other end's fault (a peer that breaks the protocol, an
uplink that goes away); it ends at most the stream or link it came from.
LocalError: ours to fix (configuration, the control socket, the pidfile, a
refused command); its message is one line for the operator.
"""


class TcprcError(Exception):
    """Root of every tcprc error."""


class PeerError(TcprcError):
    """Caused by the peer or the network, not by us or our config."""


class LocalError(TcprcError):
    """Caused here (configuration, environment, operator); one line for the user."""


class ConfigError(LocalError):
    """A configuration problem, already phrased as one line for the user."""


class ControlError(LocalError):
    """The control socket could not be set up; one line for the log."""


class PidFileError(LocalError):
    """A pidfile problem, phrased as one line for the user."""


class AlreadyRunning(PidFileError):
    """Another live agent holds the pidfile."""


class CommandError(LocalError):
    """A command that fails; the channel answers `ERROR <message>`."""
