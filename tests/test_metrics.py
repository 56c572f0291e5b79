"""Prometheus metrics (shells/metrics.py): what a scrape shows, on every runtime.

The collector is checked on fixed status documents; then each runtime serves the metrics of
a live relay and client (tests/runtimes.py adapters, no TUN) and the counters move with real
traffic; last, the ``candy`` daemon serves them with ``--metrics``.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from runtimes import HOST, AsyncioAdapter, RuntimeAdapter, adapter_fixture, free_port, wait_until
from test_behaviour import client_config, exchange, join, server_config

from candy_core.server import REJECTIONS
from candy_core.status import PATHS
from shells import metrics
from shells.metrics import (
    AsyncioMetricsServer,
    GeventMetricsServer,
    StatusCollector,
    ThreadedMetricsServer,
    metrics_app,
    metrics_registry,
)

ROOT = Path(__file__).resolve().parents[1]
RUNTIMES = ("asyncio", "gevent", "threaded")

#: {(sample name, frozenset of label items): value}
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> tuple[Samples, dict[str, str]]:
    """The samples of an exposition, and each family's type."""
    samples: Samples = {}
    types: dict[str, str] = {}
    for family in text_string_to_metric_families(text):
        types[family.name] = family.type
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples, types


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def scrape_registry(doc: dict[str, Any]) -> tuple[Samples, dict[str, str]]:
    from prometheus_client import generate_latest

    return parse(generate_latest(metrics_registry(lambda: doc)).decode())


# --- the collector, on fixed documents --------------------------------------------------------
SERVER_DOC: dict[str, Any] = {
    "role": "server",
    "version": "9.8.7",
    "runtime": "gevent",
    "listen": "ws://0.0.0.0:8080/",
    "uptime_s": 12.5,
    "clients": [
        {"ip": "10.99.0.1", "vmac": None, "remote": "198.51.100.1:4000", "since": 1.0,
         "tx_bytes": 10, "rx_bytes": 20, "frames_dropped": 0, "backlog": 0},
        {"ip": "10.99.0.2", "vmac": None, "remote": "198.51.100.2:4000", "since": 1.0,
         "tx_bytes": 30, "rx_bytes": 40, "frames_dropped": 1, "backlog": 0},
    ],
    "counters": {
        "connections": 7, "open_connections": 3, "authenticated": 4,
        "rejected": {"wrong_password": 2, "http": 1}, "refused": 5,
        "frames_relayed": 100, "frames_dropped": 6, "backlog_dropped": 8,
        "rx_bytes": 1000, "tx_bytes": 2000,
    },
}  # fmt: skip

_PATH = {"tx_bytes": 0, "rx_bytes": 0, "tx_packets": 0, "rx_packets": 0}
CLIENT_DOC: dict[str, Any] = {
    "role": "client",
    "version": "9.8.7",
    "runtime": "asyncio",
    "name": "office",
    "interface": "candy-office",
    "address": "10.99.0.1/24",
    "server": {"url": "ws://192.0.2.1:8080/", "state": "connected", "since": 1.0,
               "last_error": None},
    "peers": [
        {"ip": "10.99.0.2", "state": "CONNECTED", "path": "direct"},
        {"ip": "10.99.0.3", "state": "CONNECTED", "path": "lan"},
        {"ip": "10.99.0.4", "state": "PREPARING", "path": "relay"},
    ],
    "counters": {
        "packets_to_server": 11, "packets_from_server": 12, "packets_dropped": 3,
        "reconnects": 2, "datagrams_sent": 21, "datagrams_received": 22, "undecryptable": 4,
        "replayed": 5, "forwarded_for_peers": 6, "endpoint_moves_refused": 7, "implausible": 8,
    },
    "paths": {
        "direct": {"tx_bytes": 100, "rx_bytes": 200, "tx_packets": 1, "rx_packets": 2},
        "lan": dict(_PATH),
        "route": dict(_PATH),
        "relay": {"tx_bytes": 300, "rx_bytes": 400, "tx_packets": 3, "rx_packets": 4},
    },
}  # fmt: skip


def test_server_document_as_metrics() -> None:
    samples, types = scrape_registry(SERVER_DOC)
    info = {"version": "9.8.7", "runtime": "gevent", "role": "server"}
    assert value(samples, "candy_build_info", **info) == 1
    assert value(samples, "candy_server_clients") == 2
    assert value(samples, "candy_server_open_connections") == 3
    assert value(samples, "candy_server_uptime_seconds") == 12.5
    assert value(samples, "candy_server_connections_total") == 7
    assert value(samples, "candy_server_connections_refused_total") == 5
    handshakes = {
        dict(labels)["result"]: v
        for (name, labels), v in samples.items()
        if name == "candy_server_handshakes_total"
    }
    assert handshakes == {
        "ok": 4, "wrong_password": 2, "clock_skew": 0, "replay": 0, "timeout": 0,
        "malformed": 0, "idle": 0, "no_address": 0, "no_dhcp": 0, "http": 1, "protocol": 0,
    }  # fmt: skip
    assert value(samples, "candy_server_frames_relayed_total") == 100
    assert value(samples, "candy_server_frames_dropped_total", reason="dropped") == 6
    assert value(samples, "candy_server_frames_dropped_total", reason="backlog") == 8
    assert value(samples, "candy_server_bytes_total", direction="rx") == 1000
    assert value(samples, "candy_server_bytes_total", direction="tx") == 2000
    assert types["candy_server_frames_relayed"] == "counter"
    assert types["candy_server_clients"] == "gauge"
    assert not any(name.startswith("candy_client") for name, _ in samples)


def test_client_document_as_metrics() -> None:
    samples, types = scrape_registry(CLIENT_DOC)
    info = {"version": "9.8.7", "runtime": "asyncio", "role": "client"}
    assert value(samples, "candy_build_info", **info) == 1
    assert value(samples, "candy_client_connected") == 1
    assert value(samples, "candy_client_reconnects_total") == 2
    peers = {
        dict(labels)["state"]: v for (name, labels), v in samples.items()
        if name == "candy_client_peers"
    }  # fmt: skip
    assert peers == {
        "INIT": 0, "PREPARING": 1, "SYNCHRONIZING": 0, "CONNECTING": 0, "CONNECTED": 2,
        "WAITING": 0, "FAILED": 0, "NONE": 0,
    }  # fmt: skip
    assert value(samples, "candy_client_bytes_total", direction="tx", path="relay") == 300
    assert value(samples, "candy_client_bytes_total", direction="rx", path="relay") == 400
    assert value(samples, "candy_client_bytes_total", direction="tx", path="direct") == 100
    assert value(samples, "candy_client_bytes_total", direction="rx", path="lan") == 0
    assert value(samples, "candy_client_packets_total", direction="rx", path="direct") == 2
    assert value(samples, "candy_client_packets_total", direction="tx", path="relay") == 3
    dropped = {
        dict(labels)["reason"]: v for (name, labels), v in samples.items()
        if name == "candy_client_packets_dropped_total"
    }  # fmt: skip
    assert dropped == {"no_route": 3, "undecryptable": 4, "replayed": 5, "implausible": 8}
    assert value(samples, "candy_client_server_packets_total", direction="tx") == 11
    assert value(samples, "candy_client_datagrams_total", direction="rx") == 22
    assert value(samples, "candy_client_forwarded_for_peers_total") == 6
    assert value(samples, "candy_client_endpoint_moves_refused_total") == 7
    assert types["candy_client_bytes"] == "counter" and types["candy_client_peers"] == "gauge"
    assert not any(name.startswith("candy_server") for name, _ in samples)


def test_a_client_between_connections_is_not_connected() -> None:
    doc = {**CLIENT_DOC, "server": {**CLIENT_DOC["server"], "state": "backoff"}}
    samples, _ = scrape_registry(doc)
    assert value(samples, "candy_client_connected") == 0


def test_every_rejection_label_and_path_of_the_cores_is_exported() -> None:
    assert set(metrics.REJECTION_LABELS) == {*REJECTIONS.values(), "protocol"}
    assert metrics.PATHS == PATHS


def test_registering_takes_no_snapshot_and_a_failing_one_is_a_500() -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("call start() first")

    registry = metrics_registry(broken)  # no snapshot yet: the node may not be started
    StatusCollector(broken).describe()
    statuses: list[str] = []
    body = metrics_app(registry)(
        {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": ""},
        lambda status, headers, exc_info=None: statuses.append(status),
    )
    assert statuses == ["500 Internal Server Error"]
    assert b"unavailable" in b"".join(body)


# --- every runtime, with real traffic ---------------------------------------------------------
@pytest.fixture(params=["asyncio", "asyncio-uvloop", "gevent", "threaded"])
def adapter(request: pytest.FixtureRequest) -> Iterator[RuntimeAdapter]:
    from runtimes import ADAPTERS

    if request.param not in ADAPTERS:
        pytest.skip(f"{request.param} is not available")
    yield from adapter_fixture(request)


def serve(adapter: RuntimeAdapter, node: Any) -> tuple[str, Callable[[], None]]:
    """Serve ``node``'s metrics inside the adapter's runtime: (URL, stop)."""
    if isinstance(adapter, AsyncioAdapter):

        async def start() -> AsyncioMetricsServer:
            metrics = AsyncioMetricsServer(node, HOST, 0)
            await metrics.start()
            return metrics

        served = adapter.call(start())
        return served.url, lambda: adapter.call(served.stop())
    kind = GeventMetricsServer if adapter.name == "gevent" else ThreadedMetricsServer
    blocking = kind(node, HOST, 0)
    call: Callable[[Callable[[], Any]], Any] = adapter.call  # type: ignore[attr-defined]
    call(blocking.start)
    return blocking.url, lambda: call(blocking.stop)


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        return parse(response.read().decode())[0]


def test_counters_move_with_relayed_traffic(adapter: RuntimeAdapter) -> None:
    server = adapter.start_server(server_config())
    a = adapter.start_client(client_config(server))
    b = adapter.start_client(client_config(server))
    join(server, a, b)
    server_url, stop_server_metrics = serve(adapter, server._server)  # type: ignore[attr-defined]
    client_url, stop_client_metrics = serve(adapter, a._client)  # type: ignore[attr-defined]
    try:
        runtime = "asyncio" if adapter.name.startswith("asyncio") else adapter.name
        before, client_before = scrape(server_url), scrape(client_url)
        build = {"role": "server", "runtime": runtime}
        assert any(
            name == "candy_build_info" and build.items() <= dict(labels).items()
            for name, labels in before
        )
        assert value(before, "candy_server_clients") == 2
        assert value(before, "candy_server_handshakes_total", result="ok") == 2
        assert value(client_before, "candy_client_connected") == 1
        for i in range(3):
            exchange(a, b, str(i))
        after, client_after = scrape(server_url), scrape(client_url)

        relayed = "candy_server_frames_relayed_total"
        assert value(after, relayed) >= value(before, relayed) + 6
        for direction in ("rx", "tx"):
            bytes_total = "candy_server_bytes_total"
            assert value(after, bytes_total, direction=direction) > value(
                before, bytes_total, direction=direction
            )
        relay_tx = {"direction": "tx", "path": "relay"}
        assert value(client_after, "candy_client_bytes_total", **relay_tx) > value(
            client_before, "candy_client_bytes_total", **relay_tx
        )
        assert value(client_after, "candy_client_packets_total", **relay_tx) == 3
        assert value(client_after, "candy_client_packets_total", direction="rx", path="relay") == 3
        assert value(client_after, "candy_client_peers", state="NONE") == 1  # no STUN: relayed
    finally:
        stop_client_metrics()
        stop_server_metrics()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(server_url, timeout=2)


def test_asyncio_endpoint_keeps_connections_and_refuses_nonsense() -> None:
    adapter = AsyncioAdapter()
    try:
        server = adapter.start_server(server_config())
        url, stop = serve(adapter, server._server)
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=5)
            for _ in range(2):  # one connection, two scrapes
                conn.request("GET", "/metrics")
                response = conn.getresponse()
                assert response.status == 200
                assert b"candy_server_clients 0.0" in response.read()
            conn.request("GET", "/metrics", headers={"Accept": "application/openmetrics-text"})
            response = conn.getresponse()
            assert response.getheader("Content-Type", "").startswith("application/openmetrics")
            assert response.read().endswith(b"# EOF\n")
            conn.request("POST", "/metrics", body=b"x")
            response = conn.getresponse()
            assert response.status == 405
            response.read()
            conn.close()
            with socket.create_connection((HOST, port), timeout=5) as raw:
                raw.sendall(b"NOT HTTP AT ALL\r\n\r\n")
                assert raw.recv(1024).startswith(b"HTTP/1.1 400")
                assert raw.recv(1024) == b""  # and closed
        finally:
            stop()
    finally:
        adapter.close()


# --- the daemon -------------------------------------------------------------------------------
def _daemon(runtime: str, metrics_port: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable, "-m", "shells.cli", "-m", "server",
            "-w", f"ws://{HOST}:{free_port()}", "-p", "pw", "-d", "10.99.0.0/24",
            "--metrics", f"{HOST}:{metrics_port}", "--control", "none", "--runtime", runtime,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_daemon_serves_metrics(runtime: str) -> None:
    port = free_port()
    url = f"http://{HOST}:{port}/metrics"
    proc = _daemon(runtime, port)
    try:
        found: list[Samples] = []

        def scraped() -> bool:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                found.append(scrape(url))
            except OSError:
                return False
            return True

        assert wait_until(scraped, 20, 0.1), "no metrics"
        build = {"role": "server", "runtime": runtime}
        assert any(
            name == "candy_build_info" and build.items() <= dict(labels).items()
            for name, labels in found[0]
        ), found[0]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr
    assert stderr.count(f"serving Prometheus metrics on {url}") == 1, stderr


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_daemon_exits_if_the_metrics_port_is_taken(runtime: str) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _daemon(runtime, port)
        try:
            _, stderr = proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if "[ERROR]" in line]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    assert f"cannot serve metrics on http://{HOST}:{port}/metrics" in errors[0]
    assert "in use" in errors[0]
