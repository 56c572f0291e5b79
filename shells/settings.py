"""Command line and config file of the ``candy`` daemon, turned into one frozen value.

:func:`parse_args` reads the reference implementation's flags and libconfig keys
(PROTOCOL.md section 5) plus this project's own (``--runtime``, TLS, state directory)
and returns a :class:`DaemonSettings`. It parses strings (URLs, addresses, numbers) and
reads files; the rules a value must follow live in :mod:`candy_core.config`. Any bad
value raises :class:`SettingsError` with one human-readable line naming the flag (or the
config file and key) and the reason. Nothing here opens sockets or resolves host names.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import libconf

from candy_core import (
    ClientConfig,
    ConfigError,
    FieldError,
    Network,
    SdwanRoute,
    ServerConfig,
    check_port,
    parse_interface,
    sdwan_routes,
)

__all__ = [
    "DEFAULT_STATE_DIR",
    "DEFAULT_STUN_PORT",
    "MODES",
    "RUNTIMES",
    "DaemonSettings",
    "SettingsError",
    "build_parser",
    "candy_version",
    "parse_args",
]

MODES = ("server", "client")
RUNTIMES = ("asyncio", "gevent", "threaded")
DEFAULT_STATE_DIR = Path("/var/lib/candy")
DEFAULT_STUN_PORT = 3478

_HOST_RE = re.compile(r"[A-Za-z0-9_.-]+")
_DEFAULT_WS_PORTS = {"ws": 80, "wss": 443}

#: Config file key -> command-line flag that overrides it.
_FLAGS = {
    "mode": "--mode",
    "websocket": "--websocket",
    "password": "--password",
    "dhcp": "--dhcp",
    "name": "--name",
    "tun": "--tun",
    "stun": "--stun",
    "port": "--port",
    "route": "--route",
    "discovery": "--discovery",
    "localhost": "--localhost",
    "runtime": "--runtime",
    "tls_cert": "--tls-cert",
    "tls_key": "--tls-key",
    "tls_verify": "--tls-verify",
    "tls_ca": "--tls-ca",
    "state_dir": "--state-dir",
    "confusion": "--no-confusion",
    "debug": "--debug",
    "control": "--control",
    "metrics": "--metrics",
    "sdwan": "--sdwan",
    "mtu": "--mtu",
    "clock_window": "--clock-window",
}
#: Keys of the reference's config file that this implementation does not support.
_UNSUPPORTED_KEYS = ("restart", "workers")
_SERVER_ONLY = ("dhcp", "tls_cert", "tls_key", "networks", "sdwan")
_CLIENT_ONLY = (
    "name", "tun", "stun", "port", "route", "discovery", "localhost", "confusion",
    "tls_verify", "tls_ca", "mtu",
)  # fmt: skip
_PATH_KEYS = ("tls_cert", "tls_key", "tls_ca", "state_dir", "control")
#: Where each daemon's control socket is, unless ``--control`` says otherwise.
CONTROL_DIR = Path("/run/candy")
#: Config fields that come from a differently named key.
_KEY_OF_FIELD = {"host": "websocket", "port": "websocket", "path": "websocket"}

_T = TypeVar("_T")


class SettingsError(ConfigError):
    """A flag or config file value is invalid; ``str()`` is one line saying which and why."""


@dataclass(frozen=True)
class DaemonSettings:
    """Everything the daemon of any runtime needs, validated; host names not yet resolved."""

    mode: str
    runtime: str = "asyncio"
    #: The WebSocket URL split up: the server listens on it, the client connects to it.
    ws_scheme: str = "ws"
    ws_host: str = "localhost"
    ws_port: int = 80
    #: Request target: the URL path (``/`` when empty) plus ``?query`` when present.
    ws_path: str = "/"
    #: Certificate chain and private key of a ``wss://`` server.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Client side of ``wss://``: verify the server certificate, optionally against this CA.
    tls_verify: bool = True
    tls_ca: Path | None = None
    #: Where the client caches its last address and VMAC (``address/<name>``, ``vmac/<name>``).
    state_dir: Path = DEFAULT_STATE_DIR
    #: STUN server as given (host unresolved), or ``None`` when peer-to-peer is off.
    stun_host: str | None = None
    stun_port: int | None = None
    #: Local UDP port for peer-to-peer (0: any).
    udp_port: int = 0
    debug: bool = False
    #: Even more detail than ``debug`` (per-frame traces); implies debug-level logging.
    verbose: bool = False
    no_timestamp: bool = False
    #: ``--auto-restart`` was given; accepted for compatibility and otherwise ignored.
    auto_restart: bool = False
    config_file: Path | None = None
    #: Exactly one of these is set, matching ``mode``.
    server: ServerConfig | None = None
    client: ClientConfig | None = None
    #: Warnings for the log (ignored or unknown keys, options that do not apply to the mode).
    notes: tuple[str, ...] = ()
    #: The control socket (``candy status``), or None with ``--control none``.
    control: Path | None = None
    #: Whether the operator named it (then it must open; the default may be skipped).
    control_given: bool = False
    #: Where Prometheus metrics are served (host, port), or None (the default: off).
    metrics: tuple[str, int] | None = None
    #: A server's networks (``networks`` in the config file only), or () for one network.
    networks: tuple[Network, ...] = ()

    @property
    def websocket_url(self) -> str:
        """The WebSocket URL, rebuilt from its parts (always with an explicit port)."""
        host = f"[{self.ws_host}]" if ":" in self.ws_host else self.ws_host
        return f"{self.ws_scheme}://{host}:{self.ws_port}{self.ws_path}"


def candy_version() -> str:
    """The installed ``candy-py`` version, else the one in a source tree's pyproject.toml."""
    try:
        return metadata.version("candy-py")
    except metadata.PackageNotFoundError:
        pass
    try:
        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return str(tomllib.load(f)["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``candy``; every option defaults to ``None`` (= not given)."""
    p = argparse.ArgumentParser(
        prog="candy",
        description="Candy mesh VPN (wire compatible with Candy 5.6).",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "examples:\n"
            "  candy -m server -w ws://0.0.0.0:8080/ws -p secret -d 10.0.0.0/24\n"
            "  candy -m client -w wss://vpn.example.org/ws -p secret -s stun://stun.example.org\n"
            "  candy -c /etc/candy.cfg --runtime gevent\n"
            "command-line flags override the values of the config file\n"
            "\n"
            "a running daemon:\n"
            "  candy status [--json] [-n NAME | --server | --control PATH]\n"
            "  candy ping [-n NAME | --control PATH] VIRTUAL-IP [-c COUNT]"
        ),
    )
    p.add_argument("-v", "--version", action="version", version=f"candy {candy_version()}")
    p.add_argument("-c", "--config", metavar="PATH", help="libconfig file with the same keys")
    p.add_argument("-m", "--mode", metavar="MODE", help="client or server")
    p.add_argument(
        "-w", "--websocket", metavar="URL",
        help="server: ws:// or wss:// address to listen on; client: server URL",
    )  # fmt: skip
    p.add_argument("-p", "--password", metavar="SECRET", help="shared password")
    p.add_argument("--runtime", metavar="NAME", help="asyncio (default), gevent or threaded")
    p.add_argument(
        "--state-dir", metavar="DIR", help=f"client state cache (default {DEFAULT_STATE_DIR})"
    )

    c = p.add_argument_group("client options")
    c.add_argument("-n", "--name", metavar="NAME", help="interface candy-NAME, cache key")
    c.add_argument("-t", "--tun", metavar="CIDR", help="static address a.b.c.d/prefix")
    c.add_argument("-s", "--stun", metavar="URL", help="stun://host[:port]; enables P2P")
    c.add_argument("--port", metavar="PORT", help="local UDP port for P2P (default 0: any)")
    c.add_argument("-r", "--route", metavar="COST", help="relay route cost, 0 (off) to 1000")
    c.add_argument("--discovery", metavar="SECONDS", help="discovery interval (0: off)")
    c.add_argument("--localhost", metavar="IPV4", help="LAN address to announce to peers")
    c.add_argument(
        "--no-confusion", dest="confusion", action="store_const", const=False, default=None,
        help="do not pad handshake messages",
    )  # fmt: skip
    c.add_argument(
        "--tls-verify", action=argparse.BooleanOptionalAction, default=None,
        help="verify the wss:// server certificate (default: yes)",
    )  # fmt: skip
    c.add_argument("--tls-ca", metavar="PATH", help="CA bundle to verify the server with")
    c.add_argument("--mtu", metavar="BYTES", help="TUN MTU, 576 to 1500 (default 1400)")

    s = p.add_argument_group("server options")
    s.add_argument("-d", "--dhcp", metavar="CIDR", help="dynamic address range, e.g. 10.0.0.0/24")
    s.add_argument("--tls-cert", metavar="PATH", help="certificate chain for wss://")
    s.add_argument("--tls-key", metavar="PATH", help="private key for wss://")
    s.add_argument(
        "--sdwan", metavar="ROUTES",
        help="subnet routes dev,dst,nexthop;... pushed to clients inside dev",
    )  # fmt: skip
    s.add_argument(
        "--clock-window", metavar="SECONDS",
        help="allowed handshake clock difference (default 30)",
    )  # fmt: skip

    g = p.add_argument_group("logging and process options")
    g.add_argument(
        "--debug", action="store_const", const=True, default=None, help="debug-level logging"
    )
    g.add_argument("--verbose", action="store_true", help="per-frame traces (implies --debug)")
    g.add_argument(
        "--control",
        metavar="PATH",
        help="control socket for candy status (default /run/candy/...; none: off)",
    )
    g.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (off by default). No "
        "authentication: keep it on loopback (127.0.0.1) unless you know better",
    )
    g.add_argument("--no-timestamp", action="store_true", help="log lines without timestamps")
    g.add_argument(
        "--auto-restart", action="store_true", help="accepted for compatibility; ignored"
    )
    return p


def parse_args(argv: list[str]) -> DaemonSettings:
    """Parse ``argv`` (without the program name) and the ``-c`` file into settings.

    argparse's own errors (unknown flag, missing value) exit with status 2 after
    printing the usage line; every invalid value raises :class:`SettingsError`.
    """
    ns = build_parser().parse_args(argv)
    values: dict[str, _Given] = {}
    notes: list[str] = []
    config_file = None
    if ns.config is not None:
        config_file = Path(ns.config)
        values.update(_read_config_file(config_file, notes))
    for key, flag in _FLAGS.items():
        value = getattr(ns, key)
        if value is not None:
            values[key] = _Given(value, flag, "")
    return _build(values, ns, config_file, notes)


@dataclass(frozen=True)
class _Given:
    """One value and where it came from, for error messages."""

    value: Any
    #: ``--dhcp`` for a flag, ``dhcp`` for a config file key.
    name: str
    #: ``""`` for a flag, ``"<file>: "`` for a config file key.
    where: str

    def error(self, reason: str) -> SettingsError:
        return SettingsError(f"{self.where}invalid {self.name} {self.value!r}: {reason}")


def _read_config_file(path: Path, notes: list[str]) -> dict[str, _Given]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"cannot read config file {path}: not UTF-8 text ({exc})") from None
    base = path.parent
    try:
        parsed = libconf.loads(text, filename=str(path), includedir=str(base))
    except (libconf.ConfigParseError, ValueError) as exc:
        raise SettingsError(f"cannot parse config file {path}: {exc}") from None
    where = f"{path}: "
    values: dict[str, _Given] = {}
    for key, value in parsed.items():
        if key in _FLAGS:
            if key in _PATH_KEYS and isinstance(value, str) and value:
                value = str(base / value)  # relative paths are relative to the file
            values[key] = _Given(value, key, where)
        elif key == "networks":
            values[key] = _Given(value, key, where)
        elif key in _UNSUPPORTED_KEYS:
            notes.append(f"{path}: config key {key!r} is not supported; ignored")
        else:
            notes.append(f"{path}: unknown config key {key!r}; ignored")
    return values


def _build(
    values: dict[str, _Given],
    ns: argparse.Namespace,
    config_file: Path | None,
    notes: list[str],
) -> DaemonSettings:
    def text(key: str) -> str | None:
        given = values.get(key)
        if given is None:
            return None
        if not isinstance(given.value, str):
            raise given.error("expected a string")
        return given.value

    def integer(key: str, default: int) -> object:
        """The value, a string of digits turned into an int; the config checks the rest."""
        given = values.get(key)
        if given is None:
            return default
        value = given.value
        if isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            return int(value)
        return value

    def boolean(key: str) -> bool | None:
        given = values.get(key)
        if given is None:
            return None
        value = given.value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        if not isinstance(value, bool):
            raise given.error("expected true or false")
        return value

    def path(key: str) -> Path | None:
        value = text(key)
        if value is None:
            return None
        if not value:
            raise values[key].error("the path is empty")
        return Path(value)

    mode = text("mode")
    if mode is None:
        raise SettingsError("no mode given: use -m client|server or mode in the config file")
    if mode not in MODES:
        raise values["mode"].error("expected client or server")

    runtime = text("runtime") or "asyncio"
    if runtime not in RUNTIMES:
        raise values["runtime"].error("expected asyncio, gevent or threaded")

    for key in values:
        if key in (_CLIENT_ONLY if mode == "server" else _SERVER_ONLY):
            notes.append(f"{values[key].name} does not apply to a {mode}; ignored")

    websocket = text("websocket")
    if websocket is None:
        raise SettingsError("no websocket URL given: use -w URL or websocket in the config file")
    scheme, host, port, ws_path = _websocket(values["websocket"])

    password = text("password") or ""
    tls_cert, tls_key, tls_ca = path("tls_cert"), path("tls_key"), path("tls_ca")
    tls_verify = boolean("tls_verify")
    state_dir = path("state_dir") or DEFAULT_STATE_DIR
    debug = bool(boolean("debug"))

    name = text("name") or ""
    tun = _interface(values["tun"]) if text("tun") is not None else None
    dhcp = _interface(values["dhcp"]).network if text("dhcp") is not None else None
    stun_host = stun_port = None
    if text("stun") is not None:
        stun_host, stun_port = _stun(values["stun"])
    udp_port = _port(values["port"], integer("port", 0), any_ok=True) if "port" in values else 0
    confusion = boolean("confusion")
    # Both configs are built, so that every value given is checked even where the mode
    # ignores it (a note says so); the name and the server URL only for a client.
    client_fields: dict[str, Any] = {
        "password": password,
        "tun": tun,
        "confusion": True if confusion is None else confusion,
        "localhost": text("localhost"),
        "route": integer("route", 0),
        "discovery": integer("discovery", 0),
        "mtu": integer("mtu", 1400),
        "clock_window": integer("clock_window", 30),
    }
    if mode == "client":
        client_fields.update(name=name, host=host, port=port, path=ws_path)
    client = _config(values, ClientConfig, **client_fields)
    sdwan = _sdwan(values["sdwan"]) if text("sdwan") is not None else ()
    server = _config(
        values,
        ServerConfig,
        password=password,
        dhcp=dhcp,
        sdwan=sdwan,
        clock_window=integer("clock_window", 30),
    )

    if mode == "server":
        if scheme == "wss":
            if tls_cert is None or tls_key is None:
                raise SettingsError(
                    "a wss:// server needs --tls-cert and --tls-key (or tls_cert and tls_key)"
                )
            _check_readable(values["tls_cert"], tls_cert)
            _check_readable(values["tls_key"], tls_key)
    else:
        if tls_ca is not None:
            _check_readable(values["tls_ca"], tls_ca)
        if scheme == "ws" and (tls_ca is not None or tls_verify is not None):
            notes.append("TLS options do not apply to a ws:// server URL; ignored")

    control: Path | None
    if text("control") is not None and values["control"].value.lower() == "none":
        control = None
    else:
        control = path("control") or default_control_path(mode, name)
    metrics = _listen_address(values["metrics"]) if text("metrics") is not None else None

    return DaemonSettings(
        mode=mode,
        runtime=runtime,
        ws_scheme=scheme,
        ws_host=host,
        ws_port=port,
        ws_path=ws_path,
        tls_cert=tls_cert,
        tls_key=tls_key,
        tls_verify=True if tls_verify is None else tls_verify,
        tls_ca=tls_ca,
        state_dir=state_dir,
        stun_host=stun_host,
        stun_port=stun_port,
        udp_port=udp_port,
        debug=debug,
        verbose=bool(ns.verbose),
        no_timestamp=bool(ns.no_timestamp),
        auto_restart=bool(ns.auto_restart),
        config_file=config_file,
        server=server if mode == "server" else None,
        client=client if mode == "client" else None,
        notes=tuple(notes),
        control=control,
        control_given=text("control") is not None,
        metrics=metrics,
        networks=_networks(values["networks"], server)
        if "networks" in values and mode == "server"
        else (),
    )


def default_control_path(mode: str, name: str = "") -> Path:
    """``/run/candy/server.sock``, ``/run/candy/client-<name>.sock`` or ``client.sock``."""
    if mode == "server":
        return CONTROL_DIR / "server.sock"
    return CONTROL_DIR / (f"client-{name}.sock" if name else "client.sock")


def _listen_address(given: _Given) -> tuple[str, int]:
    """``HOST:PORT`` (an IPv4 address or a host name, and a port) for the metrics endpoint."""
    host, sep, port_text = str(given.value).rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise given.error("expected HOST:PORT, e.g. 127.0.0.1:9470")
    if not _HOST_RE.fullmatch(host):
        raise given.error(f"bad host name {host!r}")
    return host, _port(given, int(port_text))


def _sdwan(given: _Given) -> tuple[SdwanRoute, ...]:
    """The ``sdwan`` routes ``dev,dst,nexthop;...``, checked by the core config."""
    try:
        return sdwan_routes(given.value)
    except FieldError as exc:
        raise given.error(exc.reason) from None


def _config(values: dict[str, _Given], build: Callable[..., _T], **fields: Any) -> _T:
    """``build(**fields)``, a refused value reported as the flag or config key it came from."""
    try:
        return build(**fields)
    except FieldError as exc:
        key = _KEY_OF_FIELD.get(exc.field, exc.field)
        given = values.get(key)
        if given is None:
            raise SettingsError(str(exc)) from None
        raise given.error(exc.reason if key == exc.field else f"{exc.field} {exc.reason}") from None


#: Keys of one entry of ``networks``; the password and dhcp default to the top-level ones.
_NETWORK_KEYS = ("path", "password", "dhcp", "sdwan", "clock_window")


def _networks(given: _Given, server: ServerConfig) -> tuple[Network, ...]:
    """The ``networks`` list of a server config file, each entry a checked :class:`Network`."""
    entries = given.value
    if not isinstance(entries, list | tuple) or not entries:
        raise SettingsError(f"{given.where}invalid networks: expected a non-empty list of groups")
    result: list[Network] = []
    seen: set[str] = set()
    for number, entry in enumerate(entries, 1):
        where = f"{given.where}networks entry {number}"
        if not isinstance(entry, dict):
            raise SettingsError(f"{where}: expected a group {{ path = ...; ... }}")
        unknown = sorted(set(entry) - set(_NETWORK_KEYS))
        if unknown:
            raise SettingsError(f"{where}: unknown key {unknown[0]!r} (expected {_NETWORK_KEYS})")
        path = entry.get("path")
        if path is None:
            raise SettingsError(f"{where}: no path given")
        where = f"{where} ({path})"
        if path in seen:
            raise SettingsError(f"{where}: the path is given twice")
        seen.add(path)
        fields: dict[str, Any] = {}
        try:
            if "password" in entry:
                fields["password"] = entry["password"]
            if "dhcp" in entry:
                dhcp = entry["dhcp"]
                if not isinstance(dhcp, str):
                    raise FieldError("dhcp", dhcp, "expected a string")
                fields["dhcp"] = parse_interface(dhcp, "dhcp").network
            if "sdwan" in entry:
                routes = entry["sdwan"]
                if not isinstance(routes, str):
                    raise FieldError("sdwan", routes, "expected a string")
                fields["sdwan"] = sdwan_routes(routes)
            if "clock_window" in entry:
                fields["clock_window"] = entry["clock_window"]
            result.append(Network(path, replace(server, **fields)))
        except ConfigError as exc:
            raise SettingsError(f"{where}: {exc}") from None
    return tuple(result)


def _port(given: _Given, port: object, *, any_ok: bool = False, what: str = "") -> int:
    """``port`` if it is a port number (0 only with ``any_ok``); ``what`` prefixes the reason."""
    try:
        check_port(given.name, port, any_ok=any_ok)
    except FieldError as exc:
        raise given.error(what + exc.reason) from None
    return cast(int, port)


def _websocket(given: _Given) -> tuple[str, str, int, str]:
    url = given.value
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _DEFAULT_WS_PORTS or not parts.netloc:
        raise given.error("expected ws://host[:port][/path] or wss://host[:port][/path]")
    if parts.username is not None or parts.password is not None:
        raise given.error("a user name or password in the URL is not supported")
    if parts.fragment:
        raise given.error("a #fragment is not allowed")
    host = _host(given, parts.hostname)
    try:
        port = parts.port
    except ValueError as exc:
        raise given.error(f"bad port ({exc})") from None
    if port is None:
        port = _DEFAULT_WS_PORTS[scheme]
    path = parts.path or "/"  # never without its leading / once there is a host
    if parts.query:
        path += "?" + parts.query
    return scheme, host, port, path


def _host(given: _Given, host: str | None) -> str:
    if not host:
        raise given.error("the host is missing")
    if ":" in host:
        try:
            return str(ipaddress.IPv6Address(host))
        except ValueError:
            raise given.error(f"bad IPv6 address {host!r}") from None
    if not _HOST_RE.fullmatch(host):
        raise given.error(f"bad host name {host!r}")
    return host


def _stun(given: _Given) -> tuple[str, int]:
    url = given.value
    parts = urlsplit(url)
    if parts.scheme.lower() == "stun" and not parts.netloc and parts.path:
        parts = urlsplit("stun://" + parts.path)  # RFC 7064 form: stun:host[:port]
    if parts.scheme.lower() != "stun" or not parts.netloc:
        raise given.error("expected stun://host[:port]")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise given.error("expected stun://host[:port] with nothing after the port")
    if parts.username is not None or parts.password is not None:
        raise given.error("a user name or password in the URL is not supported")
    host = _host(given, parts.hostname)
    try:
        port = parts.port
    except ValueError as exc:
        raise given.error(f"bad port ({exc})") from None
    return host, _port(given, DEFAULT_STUN_PORT if port is None else port, what="port ")


def _interface(given: _Given) -> ipaddress.IPv4Interface:
    try:
        return parse_interface(given.value, given.name)
    except FieldError as exc:
        raise given.error(exc.reason) from None


def _check_readable(given: _Given, path: Path) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        reason = exc.strerror or exc
        raise SettingsError(f"{given.where}cannot read {given.name} {path}: {reason}") from None
