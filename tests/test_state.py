"""StateStore: the client's VMAC and last address on disk, in the reference layout."""

from __future__ import annotations

import logging
import random
from ipaddress import IPv4Interface
from pathlib import Path

import pytest

from candy_core import ClientConfig, ClientState
from shells.state import StateStore

HEX = set("0123456789abcdef")


def is_vmac(value: bytes) -> bool:
    return len(value) == 16 and set(value.decode()) <= HEX


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The warnings a user reads in the log, as text."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def why_ignored(path: Path, content: bytes, what: str) -> str:
    """The start of the warning for an unusable state file holding ``content``."""
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return f"cannot read {path}: 'utf-8' codec can't decode byte"
    return f"ignoring an invalid cached {what} {text!r}"


def test_reference_layout(tmp_path: Path) -> None:
    store = StateStore(tmp_path, "office")
    state = store.load(random.Random(1))
    assert is_vmac(state.vmac)
    assert state.address is None
    assert (tmp_path / "vmac" / "office").read_text().strip() == state.vmac.decode()
    assert not (tmp_path / "address").exists()
    store.save_address(IPv4Interface("10.0.0.7/24"))
    assert (tmp_path / "address" / "office").read_text().strip() == "10.0.0.7/24"
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "address",
        "address/office",
        "vmac",
        "vmac/office",
    ]


def test_unnamed_network_uses_noname(tmp_path: Path) -> None:
    key = ClientConfig(name="").cache_key
    assert key == "__noname__"
    store = StateStore(tmp_path, key)
    store.load(random.Random(1))
    store.save_address(IPv4Interface("10.0.0.8/24"))
    assert (tmp_path / "vmac" / "__noname__").is_file()
    assert (tmp_path / "address" / "__noname__").is_file()
    assert ClientConfig(name="home").cache_key == "home"


def test_vmac_is_generated_once_and_reused(tmp_path: Path) -> None:
    first = StateStore(tmp_path, "net").load(random.Random(1))
    again = StateStore(tmp_path, "net").load(random.Random(2))
    assert again.vmac == first.vmac
    other = StateStore(tmp_path, "other").load(random.Random(2))
    assert other.vmac != first.vmac


def test_address_is_remembered_across_loads(tmp_path: Path) -> None:
    StateStore(tmp_path, "net").save_address(IPv4Interface("10.1.2.3/16"))
    state = StateStore(tmp_path, "net").load(random.Random(1))
    assert state == ClientState(state.vmac, IPv4Interface("10.1.2.3/16"))


def test_reads_files_written_by_the_reference(tmp_path: Path) -> None:
    (tmp_path / "vmac").mkdir()
    (tmp_path / "address").mkdir()
    (tmp_path / "vmac" / "net").write_text("e9777b653c831e8e")
    (tmp_path / "address" / "net").write_text("10.77.0.176/24\n")
    state = StateStore(tmp_path, "net").load(random.Random(1))
    assert state.vmac == b"e9777b653c831e8e"
    assert state.address == IPv4Interface("10.77.0.176/24")


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"short",
        b"E9777B653C831E8E",
        b"e9777b653c831e8e0",
        b"zzzzzzzzzzzzzzzz",
        b"\xff\xfe" * 8,
    ],
)
def test_invalid_cached_vmac_is_replaced_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "vmac").mkdir()
    (tmp_path / "vmac" / "net").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="candy.state"):
        state = StateStore(tmp_path, "net").load(random.Random(1))
    assert is_vmac(state.vmac)
    (warning,) = warnings(caplog)
    assert warning.startswith(why_ignored(tmp_path / "vmac" / "net", content, "VMAC")), warning
    assert (tmp_path / "vmac" / "net").read_text() == state.vmac.decode()
    assert StateStore(tmp_path, "net").load(random.Random(2)).vmac == state.vmac


@pytest.mark.parametrize(
    "content", [b"garbage", b"10.0.0.300/24", b"10.0.0.1/33", b"::1/128", b"\xff\x00\x01"]
)
def test_invalid_cached_address_is_ignored_with_a_warning(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "address").mkdir()
    (tmp_path / "address" / "net").write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="candy.state"):
        state = StateStore(tmp_path, "net").load(random.Random(1))
    assert state.address is None
    assert is_vmac(state.vmac)
    (warning,) = warnings(caplog)
    assert warning.startswith(why_ignored(tmp_path / "address" / "net", content, "address"))


def test_state_file_that_is_a_directory_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "address" / "net").mkdir(parents=True)
    with caplog.at_level(logging.WARNING, logger="candy.state"):
        state = StateStore(tmp_path, "net").load(random.Random(1))
    assert state.address is None
    path = tmp_path / "address" / "net"
    assert warnings(caplog) == [f"cannot read {path}: [Errno 21] Is a directory: '{path}'"]


def test_unwritable_state_dir_keeps_state_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A regular file where the directory should be: unwritable even for root.
    blocker = tmp_path / "state"
    blocker.write_text("not a directory")
    store = StateStore(blocker, "net")
    with caplog.at_level(logging.WARNING, logger="candy.state"):
        state = store.load(random.Random(1))
        store.save_address(IPv4Interface("10.0.0.7/24"))
    assert is_vmac(state.vmac)
    kept = "(the state is kept in memory only): [Errno 20] Not a directory"
    assert warnings(caplog) == [
        f"cannot read {blocker}/vmac/net: [Errno 20] Not a directory: '{blocker}/vmac/net'",
        f"cannot save {blocker}/vmac/net {kept}: '{blocker}/vmac'",
        f"cannot read {blocker}/address/net: [Errno 20] Not a directory: '{blocker}/address/net'",
        f"cannot save {blocker}/address/net {kept}: '{blocker}/address'",
    ]
    assert blocker.read_text() == "not a directory"


def test_unwritable_subdirectory_keeps_state_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "vmac").write_text("a file, not a directory")
    with caplog.at_level(logging.WARNING, logger="candy.state"):
        state = StateStore(tmp_path, "net").load(random.Random(1))
    assert is_vmac(state.vmac)
    path = tmp_path / "vmac" / "net"
    assert warnings(caplog) == [
        f"cannot read {path}: [Errno 20] Not a directory: '{path}'",
        f"cannot save {path} (the state is kept in memory only): "
        f"[Errno 17] File exists: '{tmp_path / 'vmac'}'",
    ]
    assert (tmp_path / "vmac").read_text() == "a file, not a directory"


def test_no_state_dir_is_memory_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = StateStore(None, "net")
    first = store.load(random.Random(1))
    assert is_vmac(first.vmac)
    store.save_address(IPv4Interface("10.0.0.7/24"))
    assert list(tmp_path.iterdir()) == []
    # Nothing persists: a new load makes a new VMAC and knows no address.
    second = store.load(random.Random(2))
    assert second.address is None
    assert second.vmac != first.vmac


def test_vmac_generation_is_deterministic_with_a_seeded_rng() -> None:
    a = StateStore(None, "x").load(random.Random(42))
    b = StateStore(None, "x").load(random.Random(42))
    assert a.vmac == b.vmac
