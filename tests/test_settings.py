"""The ``candy`` command line and config file (shells.settings) and the entry point (shells.cli)."""

from __future__ import annotations

import ipaddress
import logging
import sys
import types
from pathlib import Path

import pytest

from candy_core import ClientConfig, ServerConfig
from shells import cli
from shells.settings import DaemonSettings, SettingsError, parse_args

SERVER = ["-m", "server", "-w", "ws://0.0.0.0:8080/ws"]
CLIENT = ["-m", "client", "-w", "ws://vpn.example.org:8080/ws"]


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    level = root.level
    yield
    for handler in list(root.handlers):
        if handler.get_name() == "candy-cli":
            root.removeHandler(handler)
    root.setLevel(level)


def write(tmp_path: Path, text: str, name: str = "candy.cfg") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def error_of(argv: list[str]) -> str:
    with pytest.raises(SettingsError) as info:
        parse_args(argv)
    message = str(info.value)
    assert "\n" not in message
    return message


# --- command line -------------------------------------------------------------------------


def test_server_from_flags():
    s = parse_args([*SERVER, "-p", "secret", "-d", "10.0.0.0/24"])
    assert isinstance(s, DaemonSettings)
    assert (s.mode, s.runtime) == ("server", "asyncio")
    assert (s.ws_scheme, s.ws_host, s.ws_port, s.ws_path) == ("ws", "0.0.0.0", 8080, "/ws")
    assert s.client is None
    assert isinstance(s.server, ServerConfig)
    assert s.server.password == "secret"
    assert s.server.dhcp == ipaddress.IPv4Network("10.0.0.0/24")


def test_client_from_flags():
    s = parse_args(
        [
            *CLIENT,
            "-p", "pw", "-n", "home", "-t", "10.0.0.2/24", "-s", "stun://stun.example.org:3479",
            "--port", "40000", "-r", "5", "--discovery", "300", "--localhost", "192.168.1.7",
            "--no-confusion", "--runtime", "threaded", "--state-dir", "/tmp/candy-state",
        ]
    )  # fmt: skip
    assert s.server is None
    c = s.client
    assert isinstance(c, ClientConfig)
    assert (c.password, c.name, c.interface_name) == ("pw", "home", "candy-home")
    assert c.tun == ipaddress.IPv4Interface("10.0.0.2/24")
    assert (c.host, c.port, c.path) == ("vpn.example.org", 8080, "/ws")
    assert (c.route, c.discovery, c.localhost, c.confusion) == (5, 300, "192.168.1.7", False)
    assert c.stun is None  # resolved later by the shell
    assert (s.stun_host, s.stun_port, s.udp_port) == ("stun.example.org", 3479, 40000)
    assert s.runtime == "threaded"
    assert s.state_dir == Path("/tmp/candy-state")


def test_defaults():
    s = parse_args(["-m", "client", "-w", "ws://vpn.example.org"])
    assert (s.ws_port, s.ws_path) == (80, "/")
    assert parse_args(["-m", "client", "-w", "wss://vpn.example.org"]).ws_port == 443
    assert (s.runtime, s.state_dir) == ("asyncio", Path("/var/lib/candy"))
    assert (s.tls_verify, s.tls_ca, s.tls_cert, s.tls_key) == (True, None, None, None)
    assert (s.debug, s.verbose, s.no_timestamp, s.auto_restart) == (False, False, False, False)
    assert (s.stun_host, s.stun_port, s.udp_port) == (None, None, 0)
    assert s.client is not None
    assert (s.client.name, s.client.tun, s.client.confusion) == ("", None, True)
    assert (s.client.route, s.client.discovery, s.client.localhost) == (0, 0, None)
    assert parse_args([*CLIENT, "-s", "stun://stun.example.org"]).stun_port == 3478
    assert parse_args([*SERVER]).server == ServerConfig()


def test_url_query_is_kept_in_the_request_target():
    s = parse_args(["-m", "client", "-w", "wss://vpn.example.org/ws?net=a"])
    assert s.ws_path == "/ws?net=a"
    assert s.websocket_url == "wss://vpn.example.org:443/ws?net=a"


def test_stun_rfc7064_form():
    s = parse_args([*CLIENT, "-s", "stun:stun.example.org:19302"])
    assert (s.stun_host, s.stun_port) == ("stun.example.org", 19302)


def test_logging_and_process_flags():
    s = parse_args([*SERVER, "--debug", "--verbose", "--no-timestamp", "--auto-restart"])
    assert (s.debug, s.verbose, s.no_timestamp, s.auto_restart) == (True, True, True, True)


def test_client_tls_options(tmp_path):
    ca = write(tmp_path, "ca", "ca.pem")
    s = parse_args(["-m", "client", "-w", "wss://h", "--no-tls-verify", "--tls-ca", str(ca)])
    assert (s.tls_verify, s.tls_ca) == (False, ca)


def test_wss_server_with_certificate(tmp_path):
    cert, key = write(tmp_path, "c", "cert.pem"), write(tmp_path, "k", "key.pem")
    s = parse_args(["-m", "server", "-w", "wss://0.0.0.0", "--tls-cert", str(cert),
                    "--tls-key", str(key)])  # fmt: skip
    assert (s.ws_scheme, s.ws_port, s.tls_cert, s.tls_key) == ("wss", 443, cert, key)


@pytest.mark.parametrize("name", ["", "a", "123456789", "a_b.c-D"])
def test_name_accepted(name):
    s = parse_args([*CLIENT, "-n", name])
    assert s.client is not None and s.client.name == name
    assert len(s.client.interface_name) <= 15


@pytest.mark.parametrize(
    ("name", "reason"),
    [("1234567890", "at most 9 characters"), ("a/b", "only letters"), ("a b", "only letters"),
     ("..", "only letters")],
)  # fmt: skip
def test_name_rejected(name, reason):
    message = error_of([*CLIENT, "-n", name])
    assert message.startswith(f"invalid --name {name!r}: ")
    assert reason in message


def test_cross_mode_options_become_notes():
    s = parse_args([*SERVER, "-t", "10.0.0.2/24"])
    assert any("--tun" in note and "server" in note for note in s.notes)


# --- bad values ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "start"),
    [
        (["-m", "relay", "-w", "ws://h"], "invalid --mode 'relay': "),
        (["-w", "ws://h"], "no mode given"),
        ([*SERVER, "-d", "10.0.0.0/33"], "invalid --dhcp '10.0.0.0/33': "),
        ([*SERVER, "-d", "10.0.0.0"], "invalid --dhcp '10.0.0.0': "),
        ([*SERVER, "-d", "10.0.0.0/31"], "invalid --dhcp '10.0.0.0/31': "),
        ([*CLIENT, "-t", "10.0.0.300/24"], "invalid --tun '10.0.0.300/24': "),
        ([*CLIENT, "-t", "10.0.0.0/24"], "invalid --tun '10.0.0.0/24': "),
        (["-m", "client", "-w", "http://h"], "invalid --websocket 'http://h': "),
        (["-m", "client", "-w", "ws://"], "invalid --websocket 'ws://': "),
        (["-m", "client", "-w", "ws://h:99999"], "invalid --websocket 'ws://h:99999': "),
        (["-m", "client", "-w", "ws://h:0"], "invalid --websocket 'ws://h:0': "),
        (["-m", "server", "-w", "vpn.example.org"], "invalid --websocket 'vpn.example.org': "),
        (["-m", "client"], "no websocket URL given"),
        ([*CLIENT, "-s", "http://s"], "invalid --stun 'http://s': "),
        ([*CLIENT, "-s", "stun://s:70000"], "invalid --stun 'stun://s:70000': "),
        ([*CLIENT, "--port", "65536"], "invalid --port '65536': must be between 0 and 65535"),
        ([*CLIENT, "--port", "-1"], "invalid --port '-1': must be between 0 and 65535"),
        ([*CLIENT, "--port", "abc"], "invalid --port 'abc': expected an integer"),
        ([*CLIENT, "-r", "1001"], "invalid --route '1001': must be between 0 and 1000"),
        ([*CLIENT, "--discovery", "-5"], "invalid --discovery '-5': must be at least 0"),
        ([*CLIENT, "--localhost", "1.2.3"], "invalid --localhost '1.2.3': "),
        ([*CLIENT, "--runtime", "trio"], "invalid --runtime 'trio': "),
        (["-m", "server", "-w", "wss://0.0.0.0:443"], "a wss:// server needs --tls-cert"),
    ],
)
def test_bad_values(argv, start):
    assert error_of(argv).startswith(start)


def test_missing_certificate_file(tmp_path):
    key = write(tmp_path, "k", "key.pem")
    message = error_of(["-m", "server", "-w", "wss://0.0.0.0", "--tls-cert",
                        str(tmp_path / "nope.pem"), "--tls-key", str(key)])  # fmt: skip
    assert message == f"cannot read --tls-cert {tmp_path / 'nope.pem'}: No such file or directory"


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args([*CLIENT, "--no-such-flag"])
    assert info.value.code == 2
    assert "usage: candy" in capsys.readouterr().err


# --- config file ---------------------------------------------------------------------------


CONFIG = """
# a client, as the reference writes it
mode = "client";
websocket = "wss://vpn.example.org/ws";
password = "from-file"
name = "lab"
tun = "10.0.0.9/24"
stun = "stun://stun.example.org"
port = 40000
route = 5;
discovery = 300
localhost = "192.168.1.9"
runtime = "gevent"
tls_verify = false
state_dir = "state"
confusion = false
"""


def test_config_file(tmp_path):
    path = write(tmp_path, CONFIG)
    s = parse_args(["-c", str(path)])
    assert (s.mode, s.runtime, s.config_file) == ("client", "gevent", path)
    assert (s.ws_scheme, s.ws_host, s.ws_port, s.ws_path) == ("wss", "vpn.example.org", 443, "/ws")
    assert (s.stun_host, s.stun_port, s.udp_port, s.tls_verify) == (
        "stun.example.org", 3478, 40000, False,
    )  # fmt: skip
    assert s.state_dir == tmp_path / "state"  # relative to the file
    c = s.client
    assert c is not None
    assert (c.password, c.name, c.tun) == (
        "from-file",
        "lab",
        ipaddress.IPv4Interface("10.0.0.9/24"),
    )
    assert (c.route, c.discovery, c.localhost, c.confusion) == (5, 300, "192.168.1.9", False)


def test_flags_override_config_file(tmp_path):
    path = write(tmp_path, CONFIG)
    s = parse_args(["-c", str(path), "-p", "from-flag", "-n", "other", "-r", "0",
                    "--runtime", "asyncio", "--tls-verify", "-w", "ws://h:81"])  # fmt: skip
    assert s.client is not None
    assert (s.client.password, s.client.name, s.client.route) == ("from-flag", "other", 0)
    assert (s.runtime, s.tls_verify, s.ws_port, s.ws_scheme) == ("asyncio", True, 81, "ws")
    assert s.client.discovery == 300  # not overridden
    s = parse_args(["-c", str(path), "-m", "server", "-w", "ws://0.0.0.0:81"])
    assert (s.mode, s.client, s.ws_host) == ("server", None, "0.0.0.0")


def test_server_config_file_with_and_without_semicolons(tmp_path):
    for text in (
        'mode = "server";\nwebsocket = "ws://0.0.0.0:80";\ndhcp = "10.1.0.0/16";\n',
        'mode = "server"\nwebsocket = "ws://0.0.0.0:80"\ndhcp = "10.1.0.0/16"\n',
        'mode="server"\nwebsocket="ws://0.0.0.0:80"\ndhcp="10.1.0.0/16"\n',
    ):
        s = parse_args(["-c", str(write(tmp_path, text))])
        assert s.server is not None
        assert s.server.dhcp == ipaddress.IPv4Network("10.1.0.0/16")
        assert (s.ws_host, s.ws_port) == ("0.0.0.0", 80)


def test_config_file_tls_paths_relative_to_file(tmp_path):
    write(tmp_path, "c", "cert.pem")
    write(tmp_path, "k", "key.pem")
    text = 'mode = "server"\nwebsocket = "wss://0.0.0.0:8443"\ntls_cert = "cert.pem"\n'
    text += 'tls_key = "key.pem"\n'
    s = parse_args(["-c", str(write(tmp_path, text))])
    assert (s.tls_cert, s.tls_key) == (tmp_path / "cert.pem", tmp_path / "key.pem")


def test_unknown_and_unsupported_keys_become_notes(tmp_path):
    path = write(tmp_path, 'mode = "server"\nwebsocket = "ws://h"\nsdwan = "x"\npasword = "y"\n')
    notes = parse_args(["-c", str(path)]).notes
    assert any("'sdwan'" in n and "not supported" in n for n in notes)
    assert any("'pasword'" in n and "unknown" in n for n in notes)


def test_missing_config_file(tmp_path):
    path = tmp_path / "missing.cfg"
    assert (
        error_of(["-c", str(path)]) == f"cannot read config file {path}: No such file or directory"
    )


def test_unparsable_config_file(tmp_path):
    path = write(tmp_path, 'mode = "server"\nwebsocket = ws://h\n')
    message = error_of(["-c", str(path)])
    assert message.startswith(f"cannot parse config file {path}: ")
    assert "row 2" in message  # libconf's own position


@pytest.mark.parametrize(
    ("line", "start"),
    [
        ('dhcp = "10.0.0.0/33"', "invalid dhcp '10.0.0.0/33': "),
        ("port = 70000", "invalid port 70000: must be between 0 and 65535"),
        ('port = "x"', "invalid port 'x': expected an integer"),
        ("route = true", "invalid route True: expected an integer"),
        ("password = 5", "invalid password 5: expected a string"),
        ('confusion = "maybe"', "invalid confusion 'maybe': expected true or false"),
        ('websocket = "ftp://h"', "invalid websocket 'ftp://h': "),
    ],
)
def test_bad_config_values_name_the_file(tmp_path, line, start):
    path = write(tmp_path, f'mode = "server"\nwebsocket = "ws://h"\n{line}\n')
    assert error_of(["-c", str(path)]).startswith(f"{path}: {start}")


# --- main -----------------------------------------------------------------------------------


@pytest.fixture
def fake_daemon(monkeypatch):
    """A ``shells.asyncio.daemon`` stand-in whose ``run`` records the settings it got."""
    module = types.ModuleType("shells.asyncio.daemon")
    module.calls = []  # type: ignore[attr-defined]
    module.status = 0  # type: ignore[attr-defined]

    def run(settings):
        module.calls.append(settings)  # type: ignore[attr-defined]
        return module.status  # type: ignore[attr-defined]

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shells.asyncio.daemon", module)
    return module


def test_main_bad_cidr(capsys):
    assert cli.main([*SERVER, "-d", "10.0.0.0/33"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("candy: error: invalid --dhcp '10.0.0.0/33': ")
    assert err.count("\n") == 1
    assert "Traceback" not in err


def test_main_missing_config_file(capsys, tmp_path):
    assert cli.main(["-c", str(tmp_path / "x.cfg")]) == 2
    err = capsys.readouterr().err
    missing = tmp_path / "x.cfg"
    assert err == f"candy: error: cannot read config file {missing}: No such file or directory\n"


def test_main_version(capsys):
    assert cli.main(["-v"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("candy ") and out.count("\n") == 1
    assert cli.main(["--version"]) == 0


def test_main_argparse_error_returns_2(capsys):
    assert cli.main(["--bogus"]) == 2
    assert "usage: candy" in capsys.readouterr().err


def test_main_dispatches_to_runtime(fake_daemon, capsys):
    fake_daemon.status = 7
    assert cli.main([*SERVER, "-p", "x", "--no-timestamp"]) == 7
    [settings] = fake_daemon.calls
    assert isinstance(settings, DaemonSettings)
    assert (settings.mode, settings.runtime) == ("server", "asyncio")
    err = capsys.readouterr().err
    assert "server on asyncio runtime" in err
    assert "[INFO]" in err


def test_main_logging_levels(fake_daemon):
    cli.main([*SERVER])
    assert logging.getLogger().level == logging.INFO
    cli.main([*SERVER, "--debug"])
    assert logging.getLogger().level == logging.DEBUG
    handlers = [h for h in logging.getLogger().handlers if h.get_name() == "candy-cli"]
    assert len(handlers) == 1  # a second main() replaces, not adds


def test_main_keyboard_interrupt(fake_daemon, capsys):
    def interrupted(settings):
        raise KeyboardInterrupt

    fake_daemon.run = interrupted
    assert cli.main([*SERVER]) == 130
    assert "Traceback" not in capsys.readouterr().err


def test_main_gevent_missing(monkeypatch, capsys):
    real_import = cli.importlib.import_module

    def fake_import(name, package=None):
        if name == "shells.gevent.daemon":
            raise ModuleNotFoundError("No module named 'gevent'", name="gevent")
        return real_import(name, package)

    monkeypatch.setattr(cli.importlib, "import_module", fake_import)
    assert cli.main([*SERVER, "--runtime", "gevent"]) == 2
    err = capsys.readouterr().err
    assert err.endswith(
        "candy: error: the gevent runtime needs the gevent package:"
        " pip install 'candy-py[gevent]'\n"
    )
