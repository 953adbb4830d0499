"""`tcprc ctl device add ID --host ADDR:PORT`: a new device for a server, both ends.

It runs in ctl's own process, from the server's config file, not in the
server: the fresh secret never crosses the control socket or reaches the
server's log, and it works while the server is down.  It writes

- ID.toml into the server's devices_dir (host and secret, mode 0600, never over
  an existing file; the server's scan or SIGHUP picks it up), and
- a complete config for the device (`tcprc device -c FILE` runs it as it is),
  printed, or written with --device-config FILE (mode 0600, never over an
  existing file) with the secret in ID.secret beside it (inline only with
  --inline-secret).

Before it writes anything it refuses, in one line, what the server would skip:
a port clashing with any port the server listens on or has configured (one
rule: addr.ports_collide), port 0, an id the config file already has.

TLS: a server with tls_cert gets a device with `tls = true` and either
`tls_ca` (a CA that verifies the server's certificate for the name the device
dials: ca.crt beside tls_cert, as scripts/tcprc-pki lays it out, else
tls_client_ca; checked by a TLS handshake in memory, so the device will not
refuse it) or, failing that, `tls_fingerprint` pinning the certificate.
"""

import hashlib
import os
import secrets
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from ..addr import WILDCARD_ADDRESSES, parse_hostport, ports_collide
from ..errors import ConfigError
from .config import SCHEMA, Config, _device_id, _hostport, device_hosts, server_ports
from .devdir import SUFFIX, read_device_file
from .files import FileProblem, read_regular_file
from .tomlwrite import format_value

MAX_PEM = 1024 * 1024   # bytes of a certificate file read here


class DeviceTls(NamedTuple):
    ca_source: str         # the server's CA file to copy as the device's tls_ca, or ""
    fingerprint: str       # "sha256:<hex>" pin when there is no CA that verifies
    client_cert: bool      # the server asks devices for a certificate (tls_client_ca)
    note: str              # one line about the choice, for the operator


class NewDevice(NamedTuple):
    ident: str
    host: str              # where its clients connect on the server
    server: str            # ADDR:PORT the device dials
    local: str             # the device's service
    secret: str
    tls: Optional[DeviceTls]


def plan_device(cfg: Config, ident: str, host: str, server: Optional[str],
                local: Optional[str]) -> NewDevice:
    """Everything checked, nothing written: ConfigError (one line) if the server would
    not serve the device as asked."""
    problem = _device_id(False)(ident)
    if problem:
        raise ConfigError("device id %s" % problem)
    problem = _hostport(False, bind=True)(host)
    if problem:
        raise ConfigError("--host %s" % problem)
    if parse_hostport(host, allow_zero_port=True)[1] == 0:
        raise ConfigError("--host %s: port 0 would be a different port at every start; a "
                          "device's clients need a fixed one" % host)
    settings = cfg.server
    if not settings.devices_dir:
        raise ConfigError("[server] devices_dir is not set in %s" % cfg.path)
    if ident in settings.devices:
        raise ConfigError("device %s is already in [server.devices.%s] of %s"
                          % (ident, ident, cfg.path))
    for what, taken in ports_of_server(cfg, ident):
        if ports_collide(host, taken):
            raise ConfigError("--host %s collides with %s %s" % (host, what, taken))
    server = server or _dial_address(settings.listen)
    problem = _hostport(False)(server)
    if problem:
        raise ConfigError("--server %s" % problem)
    local = local or SCHEMA["device"]["device"]["local"].default
    problem = _hostport(False)(local)
    if problem:
        raise ConfigError("--local %s" % problem)
    tls = device_tls(settings, parse_hostport(server)[0]) if settings.tls_cert else None
    return NewDevice(ident, host, server, local, secrets.token_urlsafe(32), tls)


def ports_of_server(cfg: Config, ident: str) -> List[Tuple[str, str]]:
    """(what, ADDR:PORT) of every port the server listens on or has configured: [server]
    listen, host, http, each device's host and service hosts, in the config file and
    in devices_dir (a file that does not load is skipped by the server too)."""
    settings = cfg.server
    ports = server_ports(settings._asdict())
    for entry in settings.devices.values():
        ports += [(what, port) for _, what, port in device_hosts(entry)]
    directory = settings.devices_dir
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        names = []   # created when the file is written
    for name in names:
        if not name.endswith(SUFFIX) or name.startswith(".") or name == ident + SUFFIX:
            continue
        try:
            entry = read_device_file(name[:-len(SUFFIX)], os.path.join(directory, name), True)
        except ConfigError:
            continue
        if entry.id not in settings.devices:
            ports += [(what + " (devices_dir)", port) for _, what, port in device_hosts(entry)]
    return ports


def _dial_address(listen: str) -> str:
    host, port = parse_hostport(listen, allow_zero_port=True)
    if host in WILDCARD_ADDRESSES or port == 0:
        raise ConfigError("[server] listen is %s: give --server ADDR:PORT, the address the "
                          "device dials" % listen)
    return listen


# ---- TLS -------------------------------------------------------------------------

def device_tls(settings: Any, name: str) -> DeviceTls:
    """How the device will check this server: a CA that verifies its certificate for
    `name`, else a pin of the certificate."""
    client_cert = bool(settings.tls_client_ca)
    beside = os.path.join(os.path.dirname(settings.tls_cert), "ca.crt")
    why = "no ca.crt beside %s" % settings.tls_cert
    for candidate in dict.fromkeys((beside, settings.tls_client_ca)):   # in order, once
        if not candidate or not os.path.isfile(candidate):
            continue
        problem = _verify_with(candidate, settings.tls_cert, settings.tls_key, name)
        if problem is None:
            return DeviceTls(candidate, "", client_cert,
                             "the device checks the server's certificate against %s" % candidate)
        why = "%s does not verify it for %s: %s" % (candidate, name, problem)
    pin = certificate_fingerprint(settings.tls_cert)
    return DeviceTls("", pin, client_cert,
                     "the device pins the server's certificate (%s): a new certificate "
                     "needs a new pin" % why)


def certificate_fingerprint(path: str) -> str:
    """"sha256:<64 hex>" of the DER of the first certificate in the PEM file `path`,
    as [device] tls_fingerprint takes it."""
    import ssl
    text = read_regular_file(path, MAX_PEM).data.decode("ascii", "replace")
    begin, end = "-----BEGIN CERTIFICATE-----", "-----END CERTIFICATE-----"
    start = text.find(begin)
    stop = text.find(end, start)
    if start < 0 or stop < 0:
        raise ConfigError("%s: no PEM certificate in it" % path)
    der = ssl.PEM_cert_to_DER_cert(text[start:stop + len(end)])
    return "sha256:" + hashlib.sha256(der).hexdigest()


def _verify_with(ca: str, cert: str, key: str, name: str) -> Optional[str]:
    """None when a device trusting `ca` accepts the server's cert/key for `name` (a TLS
    handshake between two in-memory ends), else why not."""
    import ssl
    try:
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(cert, key)
        client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)   # verifies chain and name
        client.load_verify_locations(ca)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return getattr(exc, "strerror", None) or str(exc)
    bios = [ssl.MemoryBIO() for _ in range(4)]
    ends = [client.wrap_bio(bios[0], bios[1], server_hostname=name),
            server.wrap_bio(bios[2], bios[3], server_side=True)]
    done = [False, False]
    for _ in range(16):
        for i, end in enumerate(ends):
            if done[i]:
                continue
            try:
                end.do_handshake()
                done[i] = True
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLCertVerificationError as exc:
                return exc.verify_message or str(exc)
            except ssl.SSLError as exc:
                return exc.reason or str(exc)
        bios[2].write(bios[1].read())
        bios[0].write(bios[3].read())
        if all(done):
            return None
    return "the handshake did not finish"


# ---- the files ---------------------------------------------------------------------

def server_file_text(device: NewDevice) -> str:
    return ("# device %s, written by `tcprc ctl device add`\nhost = %s\nsecret = %s\n"
            % (device.ident, format_value(device.host), format_value(device.secret)))


def device_config_text(device: NewDevice, inline_secret: bool, source: str) -> str:
    """The device's whole config: `tcprc device -c FILE` runs it as it is.  Relative
    file names are beside FILE (config.py reads them there)."""
    lines = ["# tcprc device %s, written by `tcprc ctl device add` from %s." % (device.ident, source),
             "# Run it with: tcprc device -c THIS-FILE",
             "[device]",
             "# the server this device dials, and the service its clients reach",
             "server = %s" % format_value(device.server),
             "local = %s" % format_value(device.local),
             "# protocol v2 with this identity: never falls back to the legacy protocol",
             "protocol = \"v2\"",
             "id = %s" % format_value(device.ident)]
    if inline_secret:
        lines += ["# keep this file mode 0600: it holds the secret",
                  "secret = %s" % format_value(device.secret)]
    else:
        lines += ["# the secret, in a file beside this one (mode 0600)",
                  "secret_file = %s" % format_value(device.ident + ".secret")]
    tls = device.tls
    if tls is not None:
        lines += ["# TLS on the uplink: " + tls.note, "tls = true"]
        if tls.ca_source:
            lines.append("tls_ca = \"ca.crt\"")
        else:
            lines.append("tls_fingerprint = %s" % format_value(tls.fingerprint))
        if tls.client_cert:
            lines += ["# the server asks for this device's certificate (CN = its id): make it",
                      "# with scripts/tcprc-pki device CA-DIR %s, beside this file" % device.ident,
                      "tls_cert = %s" % format_value(device.ident + ".crt"),
                      "tls_key = %s" % format_value(device.ident + ".key")]
    return "\n".join(lines) + "\n"


def write_new_file(path: str, data: bytes, owner: Optional[Tuple[int, int]] = None) -> None:
    """`path` with `data`, mode 0600, never over an existing file, never seen half
    written (a temporary dot name, then a hard link); `owner`: (uid, gid) to give it.
    ConfigError (one line) if it cannot."""
    directory = os.path.dirname(path) or "."
    temp = os.path.join(directory, ".%s.%d.tmp" % (os.path.basename(path), os.getpid()))
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                if owner is not None:
                    os.fchown(handle.fileno(), *owner)
            os.link(temp, path)
        finally:
            os.unlink(temp)
    except FileExistsError:
        raise ConfigError("%s exists already: remove it first to replace it" % path) from None
    except OSError as exc:
        raise ConfigError("cannot write %s: %s" % (path, exc.strerror or exc)) from None


def directory_owner(directory: str) -> Optional[Tuple[int, int]]:
    """Run as root for a server that runs as its own user (who owns devices_dir, or
    /etc/tcprc above it): what root writes there goes to that user, or the server
    could not read it."""
    if os.geteuid() != 0:
        return None
    info = os.stat(directory)
    return (info.st_uid, info.st_gid) if info.st_uid != 0 else None


def make_directory(directory: str) -> None:
    """devices_dir, created 0700 if missing, owned like the directory above it."""
    if os.path.isdir(directory):
        return
    try:
        os.makedirs(directory, mode=0o700)
        owner = directory_owner(os.path.dirname(os.path.abspath(directory)))
        if owner is not None:
            os.chown(directory, *owner)
    except OSError as exc:
        raise ConfigError("cannot create %s: %s" % (directory, exc.strerror or exc)) from None


def _make_private_directory(directory: str) -> None:
    """Where --device-config goes, created 0700 if missing: it will hold a secret."""
    try:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError("cannot create %s: %s" % (directory, exc.strerror or exc)) from None


def write_device(cfg: Config, device: NewDevice, device_config: Optional[str],
                 inline_secret: bool) -> List[str]:
    """Write the files; the paths written.  Nothing is left behind if one fails."""
    directory = cfg.server.devices_dir
    server_path = os.path.join(directory, device.ident + SUFFIX)
    planned: List[Tuple[str, bytes]] = []
    if device_config:
        text = device_config_text(device, inline_secret, cfg.path or "the defaults")
        planned.append((device_config, text.encode("utf-8")))
        beside = os.path.dirname(os.path.abspath(device_config))
        if not inline_secret:
            planned.append((os.path.join(beside, device.ident + ".secret"),
                            (device.secret + "\n").encode("ascii")))
        if device.tls is not None and device.tls.ca_source:
            ca = read_regular_file(device.tls.ca_source, MAX_PEM).data
            ca_path = os.path.join(beside, "ca.crt")
            if _same_content(ca_path, ca):
                ca_path = ""   # already there (another device's config beside it)
            if ca_path:
                planned.append((ca_path, ca))
    for path, _ in planned + [(server_path, b"")]:
        if os.path.lexists(path):
            raise ConfigError("%s exists already: remove it first to replace it" % path)
    make_directory(directory)
    if device_config:
        _make_private_directory(os.path.dirname(os.path.abspath(device_config)))
    written: List[str] = []
    try:
        for path, data in planned:
            write_new_file(path, data)
            written.append(path)
        # Last, so the server never serves a device whose config was not written.
        write_new_file(server_path, server_file_text(device).encode("utf-8"),
                       directory_owner(directory))
        written.append(server_path)
    except ConfigError:
        for path in written:
            os.unlink(path)
        raise
    return written


def _same_content(path: str, data: bytes) -> bool:
    try:
        return read_regular_file(path, MAX_PEM).data == data
    except FileProblem:
        return False


# ---- is the server there? -------------------------------------------------------------

def server_state(cfg: Config, ident: str, ask: Any) -> str:
    """One line: whether a server answers on the config's control socket and will pick
    the device up.  `ask(path, line)` sends one command, returns its answer lines."""
    sock = cfg.control.socket
    if not sock:
        return ("[control] socket is empty in %s: cannot tell whether the server runs; a "
                "running one serves %s within 5 s (devices_dir scan) or at once on SIGHUP"
                % (cfg.path, ident))
    try:
        lines = ask(sock, "config get server.devices_dir")
    except OSError as exc:
        return ("no server answers on %s (%s): %s is served once the server starts with %s"
                % (sock, exc.strerror or exc, ident, cfg.path))
    running = _answered_dir(lines)
    if running is None:
        return "the server on %s answered %r: cannot tell whether it reads devices_dir" % (
            sock, lines[-1] if lines else "")
    if os.path.realpath(running) != os.path.realpath(cfg.server.devices_dir):
        return ("the server answering on %s reads devices_dir %s, not %s: it will not serve "
                "%s until it runs with %s" % (sock, running or '""', cfg.server.devices_dir,
                                             ident, cfg.path))
    return ("the server answering on %s serves %s within 5 s (its devices_dir scan), or at "
            "once on SIGHUP" % (sock, ident))


def _answered_dir(lines: List[str]) -> Optional[str]:
    from .tomlread import tomllib
    if len(lines) != 2 or lines[-1] != "OK":
        return None
    try:
        value: Dict[str, Any] = tomllib.loads(lines[0])
        return value["server"]["devices_dir"]
    except (tomllib.TOMLDecodeError, KeyError, TypeError):
        return None
