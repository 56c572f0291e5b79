"""Prometheus metrics: a node's status document as counters and gauges, on every runtime.

Each scrape asks the node for its ``candy status`` document (the shells' ``status()``, see
:mod:`shells.operate`) and turns it into metric families with :class:`StatusCollector`, in
a private :class:`~prometheus_client.CollectorRegistry` per node (never the global one). The
document is read inside the node's runtime, never from a foreign thread:

- asyncio: :class:`AsyncioMetricsServer` answers HTTP (with h11) on the node's own event
  loop, so ``status()`` runs on the loop like every other call into the core;
- gevent: :class:`GeventMetricsServer` is a ``gevent.pywsgi`` server, its requests are
  greenlets of the node's hub;
- threaded: :class:`ThreadedMetricsServer` is a ``wsgiref`` server in a thread of its own;
  ``status()`` takes the node's lock.

All three serve the same WSGI application (prometheus_client's, which negotiates the text or
OpenMetrics format and gzip), at any path; the URL they log is ``http://HOST:PORT/metrics``.

The endpoint has no authentication and tells whoever reaches it which peers a node talks to
and how much: keep it on loopback (``127.0.0.1``) unless the operator knows better (a
scrape-only interface behind a firewall, say).
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import unquote
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import h11
from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from candy_core import State
from shells.common import AcceptBackoff

if TYPE_CHECKING:
    from shells.asyncio.accept import Acceptor

__all__ = [
    "AsyncioMetricsServer",
    "GeventMetricsServer",
    "MetricsError",
    "StatusCollector",
    "ThreadedMetricsServer",
    "metrics_app",
    "metrics_registry",
    "metrics_url",
    "with_metrics",
    "with_metrics_async",
]

log = logging.getLogger("candy.metrics")

#: The labels of the relay's ``rejected`` counters (``candy_core.server.REJECTIONS`` and
#: "protocol"), exported as zeros until they happen. A label not listed here is exported too.
REJECTION_LABELS = (
    "wrong_password",
    "clock_skew",
    "replay",
    "timeout",
    "malformed",
    "idle",
    "no_address",
    "no_dhcp",
    "http",
    "protocol",
)
#: Every state a peer can be in: the peer state machine's, and "NONE" without peer-to-peer.
PEER_STATES = (*(state.value for state in State), "NONE")
#: The paths of a client's packets (``candy_core.status.PATHS``).
PATHS = ("direct", "lan", "route", "relay")
#: Connections an :class:`AsyncioMetricsServer` holds at once; more are closed at once.
MAX_CONNECTIONS = 16
#: Seconds an idle keep-alive connection (or an unfinished request) is kept.
IDLE_TIMEOUT = 60.0

Snapshot = Callable[[], Mapping[str, Any]]
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class HasStatus(Protocol):
    """A shell's server or client: anything with the ``candy status`` document."""

    def status(self) -> dict[str, Any]: ...


# --- the collector ----------------------------------------------------------------------------
class StatusCollector(Collector):
    """Metric families made from ``snapshot()``, a status document, on every scrape.

    ``snapshot`` must be safe to call where the scrape runs (see the module's docstring); an
    exception from it fails the scrape (HTTP 500), rather than serving made-up numbers.
    """

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        """Nothing: registering must not take a snapshot (the node may not be started)."""
        return []

    def collect(self) -> Iterator[Metric]:
        yield from status_metrics(self._snapshot())


def status_metrics(doc: Mapping[str, Any]) -> list[Metric]:
    """The metric families of one status document (a server's or a client's)."""
    info = InfoMetricFamily(
        "candy_build",
        "Candy version, runtime and role of this node (always 1)",
        value={
            "version": str(doc.get("version", "")),
            "runtime": str(doc.get("runtime", "")),
            "role": str(doc.get("role", "")),
        },
    )
    if doc.get("role") == "server":
        return [info, *_server_metrics(doc)]
    return [info, *_client_metrics(doc)]


def _gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, text, value=value)


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, text, value=value)


def _labelled(
    family: GaugeMetricFamily | CounterMetricFamily, samples: Iterable[tuple[list[str], float]]
) -> Metric:
    for labels, value in samples:
        family.add_metric(labels, value)
    return family


def _server_metrics(doc: Mapping[str, Any]) -> list[Metric]:
    c = doc["counters"]
    rejected: Mapping[str, int] = c.get("rejected", {})
    results = {"ok": c["authenticated"], **dict.fromkeys(REJECTION_LABELS, 0), **rejected}
    return [*_totals(doc, c, results), *_network_metrics(c.get("networks") or {})]


def _network_metrics(networks: Mapping[str, Mapping[str, Any]]) -> list[Metric]:
    """Per-network families (label ``network``: the URL path) of a relay with networks."""
    if not networks:
        return []
    items = list(networks.items())
    return [
        _labelled(
            GaugeMetricFamily(
                "candy_server_network_clients",
                "Authenticated clients connected now, by network",
                labels=["network"],
            ),
            (([path], n.get("clients", 0)) for path, n in items),
        ),
        _labelled(
            CounterMetricFamily(
                "candy_server_network_connections_total",
                "Connections routed to a network (by the path of their upgrade request)",
                labels=["network"],
            ),
            (([path], n["connections"]) for path, n in items),
        ),
        _labelled(
            CounterMetricFamily(
                "candy_server_network_handshakes_total",
                "Connections of a network by outcome: ok, or the reason one was closed",
                labels=["network", "result"],
            ),
            (
                ([path, result], value)
                for path, n in items
                for result, value in {"ok": n["authenticated"], **n.get("rejected", {})}.items()
            ),
        ),
        _labelled(
            CounterMetricFamily(
                "candy_server_network_frames_relayed_total",
                "Frames relayed from one client to another, by network",
                labels=["network"],
            ),
            (([path], n["frames_relayed"]) for path, n in items),
        ),
        _labelled(
            CounterMetricFamily(
                "candy_server_network_bytes_total",
                "Bytes read from (rx) and written to (tx) a network's connections",
                labels=["network", "direction"],
            ),
            (
                ([path, direction], n[f"{direction}_bytes"])
                for path, n in items
                for direction in ("rx", "tx")
            ),
        ),
    ]


def _totals(doc: Mapping[str, Any], c: Mapping[str, Any], results: dict[str, int]) -> list[Metric]:
    return [
        _gauge("candy_server_uptime_seconds", "Seconds since the relay started", doc["uptime_s"]),
        _gauge("candy_server_clients", "Authenticated clients connected now", len(doc["clients"])),
        _gauge(
            "candy_server_open_connections",
            "TCP connections open now (authenticated or not)",
            c["open_connections"],
        ),
        _counter("candy_server_connections_total", "TCP connections accepted", c["connections"]),
        _counter(
            "candy_server_connections_refused_total",
            "Connections refused at once by the per-source limits (floods)",
            c["refused"],
        ),
        _labelled(
            CounterMetricFamily(
                "candy_server_handshakes_total",
                "Connections by outcome: ok (authenticated), or the reason one was closed",
                labels=["result"],
            ),
            (([result], n) for result, n in results.items()),
        ),
        _counter(
            "candy_server_frames_relayed_total",
            "Frames relayed from one client to another",
            c["frames_relayed"],
        ),
        _labelled(
            CounterMetricFamily(
                "candy_server_frames_dropped_total",
                "Frames not relayed: dropped (bad source, no such client), or backlog (the "
                "receiver was not keeping up)",
                labels=["reason"],
            ),
            [(["dropped"], c["frames_dropped"]), (["backlog"], c["backlog_dropped"])],
        ),
        _labelled(
            CounterMetricFamily(
                "candy_server_bytes_total",
                "Bytes read from (rx) and written to (tx) all connections",
                labels=["direction"],
            ),
            [(["rx"], c["rx_bytes"]), (["tx"], c["tx_bytes"])],
        ),
    ]


def _client_metrics(doc: Mapping[str, Any]) -> list[Metric]:
    c = doc["counters"]
    states = dict.fromkeys(PEER_STATES, 0)
    for peer in doc["peers"]:
        states[peer["state"]] = states.get(peer["state"], 0) + 1
    paths: Mapping[str, Mapping[str, int]] = doc["paths"]
    names = [*PATHS, *(p for p in paths if p not in PATHS)]
    zero = {"tx_bytes": 0, "rx_bytes": 0, "tx_packets": 0, "rx_packets": 0}
    per_path = [(path, paths.get(path, zero)) for path in names]
    return [
        _gauge(
            "candy_client_connected",
            "1 while the client is connected to its server, else 0",
            1 if doc["server"]["state"] == "connected" else 0,
        ),
        _counter(
            "candy_client_reconnects_total", "Connections to the server lost", c["reconnects"]
        ),
        _labelled(
            GaugeMetricFamily("candy_client_peers", "Peers by state", labels=["state"]),
            (([state], n) for state, n in states.items()),
        ),
        _labelled(
            CounterMetricFamily(
                "candy_client_bytes_total",
                "Tunnel bytes to (tx) and from (rx) peers, by path",
                labels=["direction", "path"],
            ),
            [
                sample
                for path, t in per_path
                for sample in ((["tx", path], t["tx_bytes"]), (["rx", path], t["rx_bytes"]))
            ],
        ),
        _labelled(
            CounterMetricFamily(
                "candy_client_packets_total",
                "Tunnel packets to (tx) and from (rx) peers, by path",
                labels=["direction", "path"],
            ),
            [
                sample
                for path, t in per_path
                for sample in ((["tx", path], t["tx_packets"]), (["rx", path], t["rx_packets"]))
            ],
        ),
        _labelled(
            CounterMetricFamily(
                "candy_client_packets_dropped_total",
                "Packets dropped: no_route (no peer, server down), undecryptable, replayed, "
                "implausible (peer messages with values that cannot be true)",
                labels=["reason"],
            ),
            [
                (["no_route"], c["packets_dropped"]),
                (["undecryptable"], c["undecryptable"]),
                (["replayed"], c["replayed"]),
                (["implausible"], c["implausible"]),
            ],
        ),
        _labelled(
            CounterMetricFamily(
                "candy_client_server_packets_total",
                "Messages to (tx) and from (rx) the server",
                labels=["direction"],
            ),
            [(["tx"], c["packets_to_server"]), (["rx"], c["packets_from_server"])],
        ),
        _labelled(
            CounterMetricFamily(
                "candy_client_datagrams_total",
                "UDP datagrams sent (tx) and received (rx) for peer-to-peer",
                labels=["direction"],
            ),
            [(["tx"], c["datagrams_sent"]), (["rx"], c["datagrams_received"])],
        ),
        _counter(
            "candy_client_forwarded_for_peers_total",
            "Packets this client forwarded for other peers (relay routing)",
            c["forwarded_for_peers"],
        ),
        _counter(
            "candy_client_endpoint_moves_refused_total",
            "Heartbeats from a new address ignored while the peer's endpoint was alive",
            c["endpoint_moves_refused"],
        ),
    ]


def metrics_registry(snapshot: Snapshot) -> CollectorRegistry:
    """A private registry holding one :class:`StatusCollector` of ``snapshot``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(snapshot))
    return registry


def metrics_app(registry: CollectorRegistry) -> WSGIApp:
    """prometheus_client's WSGI app; a scrape that fails is one log line and an HTTP 500."""
    app: WSGIApp = make_wsgi_app(registry)

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        try:
            return app(environ, start_response)
        except Exception as exc:
            log.warning("metrics: cannot take a snapshot: %s", exc)
            start_response(
                "500 Internal Server Error",
                [("Content-Type", "text/plain; charset=utf-8")],
                sys.exc_info(),
            )
            return [b"candy: status unavailable\n"]

    return guarded


def metrics_url(host: str, port: int) -> str:
    """``http://host:port/metrics`` (an IPv6 address in brackets)."""
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


class MetricsError(OSError):
    """The metrics endpoint cannot listen; ``str()`` is one line that names it and says why."""

    def __str__(self) -> str:
        return str(self.strerror)


def _bind_error(host: str, port: int, exc: OSError) -> MetricsError:
    errno = exc.errno if isinstance(exc.errno, int) else 0
    why = os.strerror(errno) if errno > 0 else str(exc.strerror or exc)
    return MetricsError(exc.errno, f"cannot serve metrics on {metrics_url(host, port)}: {why}")


# --- asyncio: HTTP with h11 on the node's own loop --------------------------------------------
class _HttpConnection(asyncio.Protocol):
    """One HTTP/1.1 connection (keep-alive, pipelining) answered by the WSGI app."""

    def __init__(self, server: AsyncioMetricsServer) -> None:
        self._server = server
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=16384)
        self._transport: asyncio.Transport | None = None
        self._request: h11.Request | None = None
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if len(self._server._connections) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self._transport = transport
        self._server._connections.add(self)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._server._connections.discard(self)
        self._transport = None
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return
        self._h11.receive_data(data)
        self._process()

    def eof_received(self) -> bool:
        if self._transport is not None:
            self._h11.receive_data(b"")
            self._process()
        return False  # the transport closes itself

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _arm(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        self._idle = asyncio.get_running_loop().call_later(IDLE_TIMEOUT, self.close)

    def _process(self) -> None:
        conn = self._h11
        while self._transport is not None:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                self._refuse(exc.error_status_hint)
                return
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self._request = event
            elif isinstance(event, h11.EndOfMessage):
                self._respond()
            elif isinstance(event, h11.ConnectionClosed):
                self.close()
                return

    def _respond(self) -> None:
        assert self._request is not None and self._transport is not None
        request, self._request = self._request, None
        status, headers, body = self._server._call_app(request)
        conn = self._h11
        reason = status.partition(" ")[2].encode("latin-1")
        headers = [*headers, ("Content-Length", str(len(body)))]
        out = conn.send(h11.Response(status_code=int(status[:3]), headers=headers, reason=reason))
        chunks = [out or b""]
        if request.method != b"HEAD":
            chunks.append(conn.send(h11.Data(data=body)) or b"")
        chunks.append(conn.send(h11.EndOfMessage()) or b"")
        self._transport.write(b"".join(chunks))
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
            self._arm()
        else:
            self.close()

    def _refuse(self, status_code: int) -> None:
        """A request h11 cannot parse: answer with ``status_code`` (if still possible), close."""
        conn = self._h11
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE) and self._transport is not None:
            try:
                head = conn.send(
                    h11.Response(
                        status_code=status_code,
                        headers=[("Content-Length", "0"), ("Connection", "close")],
                    )
                )
                self._transport.write((head or b"") + (conn.send(h11.EndOfMessage()) or b""))
            except h11.LocalProtocolError:
                pass
        self.close()


class AsyncioMetricsServer:
    """Prometheus metrics of ``node`` on the running asyncio loop (the node's own)::

        async with Server(config, "0.0.0.0", 8080) as relay:
            async with AsyncioMetricsServer(relay, "127.0.0.1", 9470) as metrics:
                print(metrics.url)
                await relay.serve_forever()

    ``status()`` is called on the loop, as it must be; nothing runs in another thread. Port 0
    picks a free port (:attr:`port` is the real one after :meth:`start`).
    """

    def __init__(self, node: HasStatus, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.registry = metrics_registry(node.status)
        self._app = metrics_app(self.registry)
        self._acceptor: Acceptor | None = None
        self._connections: set[_HttpConnection] = set()

    @property
    def url(self) -> str:
        return metrics_url(self.host, self.port)

    async def start(self) -> None:
        """Listen; raises :class:`MetricsError` (an OSError) if it cannot."""
        from shells.asyncio.accept import Acceptor  # the asyncio shells load only here

        # Our own accept, not create_server(): out of file descriptors it backs off and logs
        # one line a second (see shells.asyncio.accept).
        loop = asyncio.get_running_loop()
        acceptor = Acceptor(loop, lambda: _HttpConnection(self), None, log, "metrics connections")
        try:
            await acceptor.listen(self.host, self.port)
        except OSError as exc:
            raise _bind_error(self.host, self.port, exc) from exc
        self._acceptor = acceptor
        self.port = acceptor.sockets[0].getsockname()[1]
        log.info("serving Prometheus metrics on %s", self.url)

    async def stop(self) -> None:
        """Stop listening and close every connection (idempotent)."""
        acceptor, self._acceptor = self._acceptor, None
        if acceptor is None:
            return
        acceptor.close()
        for connection in list(self._connections):
            connection.abort()

    async def __aenter__(self) -> AsyncioMetricsServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def _call_app(self, request: h11.Request) -> tuple[str, list[tuple[str, str]], bytes]:
        """Run the WSGI app for ``request``: (status line, headers, body)."""
        target = request.target.decode("latin-1")
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": request.method.decode("latin-1"),
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote(path),
            "QUERY_STRING": query,
            "SERVER_NAME": self.host,
            "SERVER_PORT": str(self.port),
            "SERVER_PROTOCOL": "HTTP/" + request.http_version.decode("latin-1"),
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": False,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        for name, value in request.headers:
            key = "HTTP_" + name.decode("latin-1").upper().replace("-", "_")
            text = value.decode("latin-1")
            environ[key] = f"{environ[key]},{text}" if key in environ else text
        response: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            response[:] = [status, headers]
            return lambda data: None

        chunks = self._app(environ, start_response)
        try:
            body = b"".join(chunks)
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        status, headers = response
        return status, list(headers), body


class _AsyncNode(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


class MeteredAsyncNode:
    """An asyncio node and its metrics endpoint, started and stopped together."""

    def __init__(self, node: _AsyncNode, listen: tuple[str, int] | None) -> None:
        self.node = node
        self.metrics = AsyncioMetricsServer(node, *listen) if listen is not None else None

    async def start(self) -> None:
        """Start the node, then the endpoint."""
        await self.node.start()
        if self.metrics is not None:
            await self.metrics.start()

    async def stop(self) -> None:
        """Stop the endpoint, then the node."""
        if self.metrics is not None:
            await self.metrics.stop()
        await self.node.stop()


def with_metrics_async(node: _AsyncNode, listen: tuple[str, int] | None) -> MeteredAsyncNode:
    """``node`` with its metrics served on ``listen`` (host, port) while it runs (None: off)."""
    return MeteredAsyncNode(node, listen)


# --- gevent and threads -----------------------------------------------------------------------
class GeventMetricsServer:
    """Prometheus metrics of ``node`` with ``gevent.pywsgi``, on the calling thread's hub::

        with Server(config, "0.0.0.0", 8080) as relay, GeventMetricsServer(relay, port=9470):
            gevent.wait()

    Each request is a greenlet of the hub that runs the node: ``status()`` takes the node's
    gevent lock like any other greenlet.
    """

    def __init__(self, node: HasStatus, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.registry = metrics_registry(node.status)
        self._app = metrics_app(self.registry)
        self._server: Any = None

    @property
    def url(self) -> str:
        return metrics_url(self.host, self.port)

    def start(self) -> None:
        """Listen; raises :class:`MetricsError` (an OSError) if it cannot."""
        server = _gevent_wsgi_server()((self.host, self.port), self._app, log=None, error_log=log)
        try:
            server.start()
        except OSError as exc:
            raise _bind_error(self.host, self.port, exc) from exc
        self._server = server
        self.port = server.server_port
        log.info("serving Prometheus metrics on %s", self.url)

    def stop(self) -> None:
        """Stop listening and end the request greenlets (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.stop(timeout=1)

    def __enter__(self) -> GeventMetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _gevent_wsgi_server() -> Any:
    """``gevent.pywsgi.WSGIServer`` whose failed accepts back off with one log line a second.

    gevent's own back-off (10 ms doubling to 1 s) prints a traceback to stderr per failure.
    """
    from gevent.pywsgi import WSGIServer as GeventWSGIServer

    class QuietAcceptServer(GeventWSGIServer):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            self._backoff = AcceptBackoff(log, "metrics connections")
            self._resume: Any = None

        def do_read(self) -> Any:
            try:
                request = super().do_read()
            except OSError as exc:
                self.stop_accepting()  # until the timer: the waiting connection stays readable
                if self._resume is not None:
                    self._resume.close()
                self._resume = self.loop.timer(self._backoff.failed(exc))
                self._resume.start(self._accept_again)
                return None
            self._backoff.succeeded()
            return request

        def _accept_again(self) -> None:
            self._resume = None
            if self.started:
                self.start_accepting()

    return QuietAcceptServer


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log on stderr
        pass


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._backoff = AcceptBackoff(log, "metrics connections")
        super().__init__(*args, **kw)

    def get_request(self) -> tuple[Any, Any]:
        # socketserver drops a failed accept and selects again at once: out of file
        # descriptors, the waiting connection keeps the socket readable and the loop spins.
        try:
            request = super().get_request()
        except OSError as exc:
            time.sleep(self._backoff.failed(exc))  # the serving thread; shutdown() waits
            raise
        self._backoff.succeeded()
        return request


class ThreadedMetricsServer:
    """Prometheus metrics of ``node`` from a ``wsgiref`` server in a thread of its own::

        with Server(config, "0.0.0.0", 8080) as relay, ThreadedMetricsServer(relay, port=9470):
            ...

    Requests run in threads; ``status()`` takes the node's lock.
    """

    def __init__(self, node: HasStatus, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port
        self.registry = metrics_registry(node.status)
        self._app = metrics_app(self.registry)
        self._httpd: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return metrics_url(self.host, self.port)

    def start(self) -> None:
        """Listen and serve in a thread; raises :class:`MetricsError` (an OSError) if it cannot."""
        try:
            family = socket.getaddrinfo(self.host, self.port, type=socket.SOCK_STREAM)[0][0]
            server_class = type(
                "_MetricsHTTPServer", (_ThreadingWSGIServer,), {"address_family": family}
            )
            httpd = server_class((self.host, self.port), _QuietHandler)
        except OSError as exc:
            raise _bind_error(self.host, self.port, exc) from exc
        httpd.set_app(self._app)
        self._httpd = httpd
        self.port = httpd.server_address[1]
        self._thread = threading.Thread(
            target=httpd.serve_forever, args=(0.2,), name="candy-metrics", daemon=True
        )
        self._thread.start()
        log.info("serving Prometheus metrics on %s", self.url)

    def stop(self) -> None:
        """Stop serving and wait for the thread (idempotent)."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> ThreadedMetricsServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _BlockingNode(Protocol):
    def start(self) -> None: ...

    def stop(self) -> None: ...

    def status(self) -> dict[str, Any]: ...


_BlockingKind = type[GeventMetricsServer] | type[ThreadedMetricsServer]


class MeteredNode:
    """A gevent or threaded node and its metrics endpoint, started and stopped together."""

    def __init__(
        self, node: _BlockingNode, listen: tuple[str, int] | None, kind: _BlockingKind
    ) -> None:
        self.node = node
        self.metrics = kind(node, *listen) if listen is not None else None

    def start(self) -> None:
        """Start the node, then the endpoint."""
        self.node.start()
        if self.metrics is not None:
            self.metrics.start()

    def stop(self) -> None:
        """Stop the endpoint, then the node."""
        if self.metrics is not None:
            self.metrics.stop()
        self.node.stop()


def with_metrics(
    node: _BlockingNode, listen: tuple[str, int] | None, kind: _BlockingKind
) -> MeteredNode:
    """``node`` with its metrics served by a ``kind`` server on ``listen`` (host, port) while
    it runs (None: off); ``kind`` is :class:`GeventMetricsServer` for a gevent node,
    :class:`ThreadedMetricsServer` for a threaded one."""
    return MeteredNode(node, listen, kind)
