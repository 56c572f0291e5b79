"""``networks`` in a server's config file (shells.settings): parsed, checked, one-line errors."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from shells import cli
from shells.settings import SettingsError, parse_args

TWO = """
mode = "server";
websocket = "ws://0.0.0.0:8080";
password = "top";
networks = (
  { path = "/office"; password = "office-pw"; dhcp = "10.1.0.0/24"; },
  { path = "/lab"; dhcp = "10.2.0.0/24"; clock_window = 60; }
);
"""


def config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "candy.cfg"
    path.write_text(text, encoding="utf-8")
    return path


def error_of(tmp_path: Path, text: str) -> str:
    with pytest.raises(SettingsError) as info:
        parse_args(["-c", str(config(tmp_path, text))])
    message = str(info.value)
    assert "\n" not in message
    return message


def test_networks_from_the_config_file(tmp_path: Path) -> None:
    s = parse_args(["-c", str(config(tmp_path, TWO))])
    office, lab = s.networks
    assert office.path == "/office" and lab.path == "/lab"
    assert office.config.password == "office-pw"
    assert office.config.dhcp == ipaddress.IPv4Network("10.1.0.0/24")
    assert lab.config.password == "top"  # inherited from the top level
    assert lab.config.clock_window == 60 and office.config.clock_window == 30
    assert not s.notes


def test_no_networks_is_one_network(tmp_path: Path) -> None:
    s = parse_args(["-m", "server", "-w", "ws://0.0.0.0:8080/ws", "-p", "x"])
    assert s.networks == ()


def test_flags_override_the_top_level_only(tmp_path: Path) -> None:
    s = parse_args(["-c", str(config(tmp_path, TWO)), "-p", "flag"])
    assert [n.config.password for n in s.networks] == ["office-pw", "flag"]


@pytest.mark.parametrize(
    ("entries", "wanted"),
    [
        ('{ path = "office"; }', 'must start with "/"'),
        ('{ path = "/a"; }, { path = "/a"; }', "given twice"),
        ('{ password = "x"; }', "no path given"),
        ('{ path = "/a"; dhcp = "10.0.0.0/31"; }', "invalid dhcp"),
        ('{ path = "/a"; dhcp = 5; }', "expected a string"),
        ('{ path = "/a"; clock_window = -1; }', "invalid clock_window"),
        ('{ path = "/a"; password = 7; }', "invalid password"),
        ('{ path = "/a"; colour = "red"; }', "unknown key 'colour'"),
        ('{ path = "/a"; sdwan = "10.1.0.0/24,172.31.0.1/24,10.1.0.2"; }', "invalid sdwan"),
        ('{ path = "/a"; sdwan = 5; }', "expected a string"),
        ('"/a"', "expected a group"),
    ],
)
def test_bad_entries(tmp_path: Path, entries: str, wanted: str) -> None:
    text = f'mode = "server"; websocket = "ws://0.0.0.0:8080"; networks = ( {entries} );'
    message = error_of(tmp_path, text)
    assert wanted in message and "networks entry" in message, message


def test_empty_networks(tmp_path: Path) -> None:
    text = 'mode = "server"; websocket = "ws://0.0.0.0:8080"; networks = ();'
    assert "non-empty list" in error_of(tmp_path, text)


def test_bad_entry_exits_2(tmp_path: Path) -> None:
    text = 'mode = "server"; websocket = "ws://0.0.0.0:8080"; networks = ( { path = "x"; } );'
    assert cli.main(["-c", str(config(tmp_path, text))]) == 2


def test_networks_in_a_client_config_is_ignored_with_a_note(tmp_path: Path) -> None:
    text = 'mode = "client"; websocket = "ws://h:8080/office"; networks = ( { path = "/a"; } );'
    s = parse_args(["-c", str(config(tmp_path, text))])
    assert s.networks == ()
    assert any("networks does not apply" in note for note in s.notes)


def test_each_network_has_its_own_sdwan_routes(tmp_path: Path) -> None:
    text = TWO.replace(
        '{ path = "/lab"; dhcp = "10.2.0.0/24";',
        '{ path = "/lab"; dhcp = "10.2.0.0/24"; sdwan = "10.2.0.0/24,172.31.0.0/24,10.2.0.9";',
    )
    office, lab = parse_args(["-c", str(config(tmp_path, text))]).networks
    assert office.config.sdwan == ()
    (route,) = lab.config.sdwan
    assert str(route.dst) == "172.31.0.0/24" and str(route.nexthop) == "10.2.0.9"
