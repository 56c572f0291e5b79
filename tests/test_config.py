"""The core configs check every field on creation (candy_core.config), once for all callers."""

from __future__ import annotations

import dataclasses
import sys
import types
from collections.abc import Callable
from ipaddress import IPv4Interface, IPv4Network
from typing import Any

import pytest

from candy_core import CandyError, Limits, config
from candy_core.config import ClientConfig, ConfigError, FieldError, ServerConfig, check_port
from shells import cli
from shells.settings import SettingsError

NET = IPv4Network
IFACE = IPv4Interface


def refused(build: Callable[..., object], field: str, **kw: Any) -> FieldError:
    """Call ``build(**kw)``, expecting ``field`` to be refused; returns the error."""
    with pytest.raises(ConfigError) as info:
        build(**kw)
    error = info.value
    assert isinstance(error, FieldError)
    assert error.field == field
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"invalid {field} ")
    assert message.endswith(f": {error.reason}")
    return error


@pytest.mark.parametrize(
    ("kw", "field", "reason"),
    [
        ({"route": 1001}, "route", "must be between 0 and 1000"),
        ({"route": -1}, "route", "must be between 0 and 1000"),
        ({"route": 99999, "name": "x" * 40, "discovery": -5}, "name", "at most 9 characters"),
        ({"route": True}, "route", "expected an integer"),
        ({"route": "5"}, "route", "expected an integer"),
        ({"discovery": -5}, "discovery", "must be at least 0"),
        ({"discovery": 1.5}, "discovery", "expected an integer"),
        ({"name": "1234567890"}, "name", "at most 9 characters"),
        ({"name": "x" * 40}, "name", "at most 9 characters"),
        ({"name": "a/b"}, "name", "only letters"),
        ({"name": "a b"}, "name", "only letters"),
        ({"name": ".."}, "name", "only letters"),
        ({"name": None}, "name", "expected a string"),
        ({"password": b"pw"}, "password", "expected a string"),
        ({"tun": "10.0.0.2/24"}, "tun", "expected an IPv4Interface"),
        ({"tun": IFACE("10.0.0.0/24")}, "tun", "network address of 10.0.0.0/24"),
        ({"tun": IFACE("10.0.0.255/24")}, "tun", "broadcast address of 10.0.0.0/24"),
        ({"tun": IFACE("10.0.0.4/30")}, "tun", "network address"),
        ({"host": ""}, "host", "must not be empty"),
        ({"port": 0}, "port", "must be between 1 and 65535"),
        ({"port": 65536}, "port", "must be between 1 and 65535"),
        ({"path": "ws"}, "path", "must start with /"),
        ({"confusion": 1}, "confusion", "expected true or false"),
        ({"stun": ("stun.example.org", 3478)}, "stun", "expected an IPv4 address"),
        ({"stun": ("192.0.2.1", 0)}, "stun", "port must be between 1 and 65535"),
        ({"stun": ("192.0.2.1",)}, "stun", "expected (IPv4 address, port)"),
        ({"stun": ["192.0.2.1", 3478]}, "stun", "expected (IPv4 address, port)"),
        ({"localhost": "1.2.3"}, "localhost", "expected an IPv4 address"),
        ({"localhost": 16909060}, "localhost", "expected an IPv4 address"),
        ({"ping_interval": 0}, "ping_interval", "more than 0 seconds"),
        ({"dead_after": -1.0}, "dead_after", "more than 0 seconds"),
        ({"dead_after": float("nan")}, "dead_after", "expected a number of seconds"),
        ({"dead_after": 15.0}, "dead_after", "more than ping_interval (15 s)"),
        ({"backoff_min": 0.0}, "backoff_min", "more than 0 seconds"),
        ({"backoff_max": "30"}, "backoff_max", "expected a number of seconds"),
        ({"backoff_min": 5.0, "backoff_max": 2.0}, "backoff_max", "at least backoff_min (5 s)"),
        ({"version": ""}, "version", "must not be empty"),
        ({"max_frame": 1499}, "max_frame", "must be at least 1500"),
        ({"clock_window": 0}, "clock_window", "must be at least 1"),
    ],
)
def test_client_refuses(kw: dict[str, Any], field: str, reason: str) -> None:
    assert reason in refused(ClientConfig, field, **kw).reason


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"route": 0},
        {"route": 1000},
        {"discovery": 0},
        {"discovery": 86400},
        {"name": ""},
        {"name": "123456789"},
        {"name": "a_b.c-D"},
        {"tun": IFACE("10.0.0.1/24")},
        {"tun": IFACE("10.0.0.254/24")},
        {"tun": IFACE("10.0.0.0/31")},
        {"tun": IFACE("10.0.0.1/32")},
        {"port": 1},
        {"port": 65535},
        {"path": "/ws?net=a"},
        {"stun": ("192.0.2.1", 1)},
        {"stun": ("192.0.2.1", 65535)},
        {"localhost": "192.168.1.7"},
        {"ping_interval": 0.3, "dead_after": 1.0},
        {"backoff_min": 2.0, "backoff_max": 2.0},
        {"max_frame": 1500},
        {"clock_window": 1},
    ],
)
def test_client_accepts_boundaries(kw: dict[str, Any]) -> None:
    made = ClientConfig(**kw)
    assert all(getattr(made, key) == value for key, value in kw.items())


@pytest.mark.parametrize(
    ("kw", "field", "reason"),
    [
        ({"dhcp": NET("10.0.0.0/31")}, "dhcp", "too small: use a prefix of /30 or less"),
        ({"dhcp": NET("10.0.0.1/32")}, "dhcp", "too small"),
        ({"dhcp": "10.0.0.0/24"}, "dhcp", "expected an IPv4Network"),
        ({"password": None}, "password", "expected a string"),
        ({"max_frame": 0}, "max_frame", "must be at least 1500"),
        ({"auth_timeout": 0}, "auth_timeout", "more than 0 seconds"),
        ({"idle_timeout": -75.0}, "idle_timeout", "more than 0 seconds"),
        ({"idle_timeout": None}, "idle_timeout", "expected a number of seconds"),
        ({"send_queue_limit": 0}, "send_queue_limit", "must be at least 1"),
        ({"clock_window": 0}, "clock_window", "must be at least 1"),
        ({"clock_window": 30.0}, "clock_window", "expected an integer"),
    ],
)
def test_server_refuses(kw: dict[str, Any], field: str, reason: str) -> None:
    assert reason in refused(ServerConfig, field, **kw).reason


@pytest.mark.parametrize(
    "kw",
    [
        {"dhcp": None},
        {"dhcp": NET("10.0.0.0/30")},
        {"dhcp": NET("10.0.0.0/8")},
        {"max_frame": 1500},
        {"auth_timeout": 0.001, "idle_timeout": 1},
        {"send_queue_limit": 1},
        {"clock_window": 1},
    ],
)
def test_server_accepts_boundaries(kw: dict[str, Any]) -> None:
    made = ServerConfig(**kw)
    assert all(getattr(made, key) == value for key, value in kw.items())


def test_message_names_field_value_and_rule() -> None:
    with pytest.raises(ConfigError, match=r"^invalid route 1001: must be between 0 and 1000$"):
        ClientConfig(route=1001)
    with pytest.raises(ConfigError) as info:
        ServerConfig(dhcp=NET("10.0.0.0/31"))
    assert str(info.value) == (
        "invalid dhcp 10.0.0.0/31: the range is too small: use a prefix of /30 or less"
    )


def test_from_strings_parses_and_leaves_the_rules_to_the_config() -> None:
    parse = ServerConfig.from_strings
    assert parse("pw", "10.0.0.5/24").dhcp == NET("10.0.0.0/24")
    assert parse("pw", "10.0.0.0/30").dhcp == NET("10.0.0.0/30")
    assert parse("pw", None).dhcp is None
    assert parse("pw", "").dhcp is None
    assert refused(parse, "dhcp", dhcp="10.0.0.0/31").value == NET("10.0.0.0/31")
    assert refused(parse, "dhcp", dhcp="10.0.0.0/33").value == "10.0.0.0/33"
    assert "prefix length is missing" in refused(parse, "dhcp", dhcp="10.0.0.0").reason
    refused(parse, "idle_timeout", dhcp="10.0.0.0/24", idle_timeout=0)


def test_replace_checks_again() -> None:
    """A shell changing a config (resolving STUN, say) cannot slip a bad value in."""
    base = ClientConfig()
    assert dataclasses.replace(base, stun=("192.0.2.1", 3478)).stun == ("192.0.2.1", 3478)
    with pytest.raises(ConfigError, match="invalid stun"):
        dataclasses.replace(base, stun=("stun.example.org", 3478))


def test_every_field_has_exactly_one_rule() -> None:
    for cls, rules in ((ClientConfig, config._CLIENT_RULES), (ServerConfig, config._SERVER_RULES)):
        assert set(rules) == {field.name for field in dataclasses.fields(cls)}


def test_check_port() -> None:
    check_port("port", 1)
    check_port("port", 0, any_ok=True)
    check_port("port", 65535, any_ok=True)
    for bad, any_ok in ((0, False), (65536, True), (-1, True), ("80", False), (True, False)):
        with pytest.raises(FieldError) as info:
            check_port("port", bad, any_ok=any_ok)
        assert info.value.field == "port"


def test_error_family() -> None:
    assert issubclass(FieldError, ConfigError)
    assert issubclass(ConfigError, CandyError) and issubclass(ConfigError, ValueError)
    assert issubclass(SettingsError, ConfigError)


def test_cli_reports_a_value_the_core_refused(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon = types.ModuleType("shells.asyncio.daemon")
    daemon.run = lambda settings: 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "shells.asyncio.daemon", daemon)  # never a real client
    assert cli.main(["-m", "client", "-w", "ws://vpn.example.org/ws", "-r", "1001"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "candy: error: invalid --route '1001': must be between 0 and 1000\n"


@pytest.mark.parametrize(
    "limits",
    [
        {"connect_rate": 0},
        {"connect_burst": 0.5},
        {"max_pending": -1},
        {"failure_cost": float("nan")},
        {"max_sources": 0},
    ],
)
def test_flood_limits_are_checked(limits: dict[str, float]) -> None:
    with pytest.raises(ConfigError, match="invalid limits"):
        ServerConfig(limits=Limits(**limits))  # type: ignore[arg-type]
    ServerConfig(limits=Limits(connect_rate=0.001, connect_burst=1, failure_cost=0))
