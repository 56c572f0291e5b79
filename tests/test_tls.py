"""wss:// end to end on 127.0.0.1: the asyncio server and client over TLS, and `websockets`.

A throw-away CA and a server certificate for ``localhost``/127.0.0.1 are made with
``cryptography`` in the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import importlib
import ipaddress
import random
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect

from candy_core import (
    ClientAuthenticated,
    ClientConfig,
    Connected,
    Disconnected,
    Reconnecting,
    ServerConfig,
    new_vmac,
)
from candy_core import messages as m
from shells.asyncio.client import Client
from shells.asyncio.server import Server
from shells.common import client_kwargs, client_ssl_context, server_ssl_context
from shells.settings import parse_args

PASSWORD = "tls-test-pw"
NETWORK = "10.98.0.0/24"
LIMIT = 8.0  # no test may take longer than this


@dataclass(frozen=True)
class Pki:
    ca: str
    cert: str
    key: str


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def make_pki(
    directory: Path, dns: str = "localhost", tag: str = "", ips: tuple[str, ...] = ("127.0.0.1",)
) -> Pki:
    """A CA and a server certificate it signed, for ``dns`` and ``ips``, as PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("candy test CA"))
        .issuer_name(_name("candy test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(dns))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(dns), *(x509.IPAddress(ipaddress.IPv4Address(a)) for a in ips)]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    paths = Pki(
        str(directory / f"ca{tag}.pem"),
        str(directory / f"server{tag}.pem"),
        str(directory / f"server{tag}.key"),
    )
    Path(paths.ca).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    Path(paths.cert).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    Path(paths.key).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(scenario(), LIMIT)

    asyncio.run(bounded())


class Events(list[Any]):
    """Events as the shell reports them (on the event loop), and a way to wait for one."""

    def __init__(self) -> None:
        super().__init__()
        self._arrived = asyncio.Event()

    def __call__(self, event: object) -> None:
        self.append(event)
        self._arrived.set()

    async def first(self, kind: type, match: Callable[[Any], bool] = lambda _: True) -> Any:
        """The first event of ``kind`` that ``match`` accepts, waiting for it to arrive."""
        while True:
            for event in self:
                if isinstance(event, kind) and match(event):
                    return event
            self._arrived.clear()
            await self._arrived.wait()


@contextlib.asynccontextmanager
async def tls_relay(pki: Pki) -> AsyncIterator[tuple[Server, Events]]:
    events = Events()
    server = Server(
        ServerConfig.from_strings(PASSWORD, NETWORK),
        "127.0.0.1",
        0,
        ssl_context=server_ssl_context(pki.cert, pki.key),
        on_event=events,
    )
    async with server:
        yield server, events


@contextlib.asynccontextmanager
async def tls_client(
    port: int, ctx: ssl.SSLContext, host: str = "localhost"
) -> AsyncIterator[tuple[Client, Events]]:
    events = Events()
    config = ClientConfig(password=PASSWORD, name="tls", host=host, port=port)
    client = Client(config, ssl_context=ctx, tun=False, on_event=events)
    async with client:
        yield client, events


async def wait_for_event(
    events: Events,
    kind: type,
    timeout: float = 4.0,
    match: Callable[[Any], bool] = lambda _: True,
) -> Any:
    return await asyncio.wait_for(events.first(kind, match), timeout)


def test_client_with_the_ca_joins(pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_relay(pki) as (server, server_events):
            ctx = client_ssl_context(verify=True, ca_file=pki.ca)
            async with tls_client(server.port, ctx) as (client, events):
                await client.wait_connected(timeout=4)
                assert client.address is not None
                assert client.address.network == IPv4Network(NETWORK)
                authed = await wait_for_event(server_events, ClientAuthenticated)
                assert authed.ip == client.address.ip
                assert not [e for e in events if isinstance(e, Disconnected)]

    run(scenario)


def test_two_tls_clients_exchange_packets(pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_relay(pki) as (server, server_events):
            ctx = client_ssl_context(verify=True, ca_file=pki.ca)
            async with (
                tls_client(server.port, ctx) as (a, _),
                tls_client(server.port, client_ssl_context(verify=True, ca_file=pki.ca)) as (
                    b,
                    _,
                ),
            ):
                await a.wait_connected(timeout=4)
                await b.wait_connected(timeout=4)
                assert a.address is not None and b.address is not None
                # Both use the name "tls" but keep state in memory: distinct VMACs, addresses.
                assert a.address != b.address
                head = bytearray(20)
                head[0] = 0x45
                head[2:4] = (24).to_bytes(2, "big")
                head[12:16] = a.address.ip.packed
                head[16:20] = b.address.ip.packed
                pkt = bytes(head) + b"ping"
                # b's AUTH has reached the relay: only then does it relay packets to b.
                await wait_for_event(
                    server_events, ClientAuthenticated, match=lambda e: e.ip == b.address.ip
                )
                a.send_packet(pkt)
                assert await asyncio.wait_for(b.recv_packet(), 4) == pkt

    run(scenario)


def test_client_connecting_by_ip_address_verifies_the_ip_san(pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_relay(pki) as (server, _):
            ctx = client_ssl_context(verify=True, ca_file=pki.ca)
            async with tls_client(server.port, ctx, host="127.0.0.1") as (client, _):
                await client.wait_connected(timeout=4)

    run(scenario)


def assert_refused_for_certificate(events: list[Any], client: Client) -> None:
    assert not client.core.authenticated
    assert not [e for e in events if isinstance(e, Connected)]
    reasons = [e.reason for e in events if isinstance(e, Disconnected)]
    assert reasons
    for reason in reasons:
        assert "certificate" in reason.lower() and "verif" in reason.lower(), reason


def test_client_without_the_ca_does_not_join(pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_relay(pki) as (server, server_events):
            ctx = client_ssl_context(verify=True)
            async with tls_client(server.port, ctx) as (client, events):
                await wait_for_event(events, Disconnected)
                await wait_for_event(events, Reconnecting)
                with pytest.raises(TimeoutError):
                    await client.wait_connected(timeout=0.5)
                assert_refused_for_certificate(events, client)
            assert not [e for e in server_events if isinstance(e, ClientAuthenticated)]

    run(scenario)


def test_certificate_for_another_name_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = make_pki(tmp_path, dns="relay.example.net", tag="-other")

    async def scenario() -> None:
        async with tls_relay(other) as (server, _):
            ctx = client_ssl_context(verify=True, ca_file=other.ca)
            async with tls_client(server.port, ctx) as (client, events):
                await wait_for_event(events, Disconnected)
                with pytest.raises(TimeoutError):
                    await client.wait_connected(timeout=0.3)
                assert_refused_for_certificate(events, client)

    run(scenario)


def test_client_without_verification_joins(pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_relay(pki) as (server, _):
            ctx = client_ssl_context(verify=False)
            async with tls_client(server.port, ctx) as (client, events):
                await client.wait_connected(timeout=4)
                assert not [e for e in events if isinstance(e, Disconnected)]

    run(scenario)


def test_plain_client_against_the_tls_server_does_not_join(pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_relay(pki) as (server, _):
            config = ClientConfig(password=PASSWORD, host="localhost", port=server.port)
            events = Events()
            async with Client(config, tun=False, on_event=events) as client:
                await wait_for_event(events, Disconnected)
                assert not client.core.authenticated

    run(scenario)


def test_websockets_library_completes_the_upgrade_over_tls(pki: Pki) -> None:
    async def scenario() -> None:
        async with tls_relay(pki) as (server, server_events):
            ctx = ssl.create_default_context(cafile=pki.ca)
            uri = f"wss://localhost:{server.port}/candy"
            async with connect(uri, ssl=ctx, compression=None, open_timeout=4) as ws:
                assert ws.response is not None and ws.response.status_code == 101
                wall = int(time.time())
                vmac = new_vmac(random.Random(5))
                await ws.send(m.Vmac.create(PASSWORD, vmac, wall).encode())
                await ws.send(m.Expected.create(PASSWORD, "0.0.0.0/0", wall).encode())
                reply = m.decode(await asyncio.wait_for(ws.recv(), 4))
                assert isinstance(reply, m.Expected) and reply.verify(PASSWORD)
                address = IPv4Interface(reply.cidr)
                assert address.network == IPv4Network(NETWORK)
                await ws.send(m.Auth.create(PASSWORD, address.ip, wall).encode())
                authed = await wait_for_event(server_events, ClientAuthenticated)
                assert authed.ip == address.ip
                pong = await ws.ping(b"candy::linux::5.6")
                await asyncio.wait_for(pong, 4)

    run(scenario)


def test_invalid_host_name_fails_and_is_retried() -> None:
    """Not only OSError: a name the resolver cannot even encode must not stall the client."""

    async def scenario() -> None:
        events = Events()
        config = ClientConfig(password=PASSWORD, host="a" * 70 + ".example", port=443)
        ctx = client_ssl_context(verify=True)
        async with Client(config, ssl_context=ctx, tun=False, on_event=events) as client:
            await wait_for_event(events, Disconnected)
            await wait_for_event(events, Reconnecting)
            assert not client.core.authenticated

    run(scenario)


# --- the client's TLS settings: verification on by default, honoured from the command line ---
SSL_MODULES = ["ssl", "gevent.ssl"]  # asyncio and threaded use the first, gevent the second


def daemon_client_context(module: str, *flags: str) -> ssl.SSLContext:
    """The SSL context the ``candy`` daemon's client would use with ``flags``."""
    argv = ["-m", "client", "-w", "wss://relay.example.net:8443", "-p", PASSWORD, *flags]
    ssl_module = importlib.import_module(module)
    ctx = client_kwargs(parse_args(argv), ssl_module)["ssl_context"]
    assert isinstance(ctx, ssl_module.SSLContext)  # gevent's: sockets that yield to the hub
    return ctx


def ca_ders(ctx: ssl.SSLContext) -> list[bytes]:
    return [bytes(der) for der in ctx.get_ca_certs(binary_form=True)]


def test_client_ssl_context_verifies_by_default() -> None:
    ctx = client_ssl_context()
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True


@pytest.mark.parametrize("module", SSL_MODULES)
def test_daemon_client_verifies_the_server_by_default(module: str) -> None:
    ctx = daemon_client_context(module)
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True
    assert daemon_client_context(module, "--tls-verify").verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("module", SSL_MODULES)
def test_no_tls_verify_turns_verification_off(module: str) -> None:
    ctx = daemon_client_context(module, "--no-tls-verify")
    assert ctx.verify_mode == ssl.CERT_NONE
    assert ctx.check_hostname is False


@pytest.mark.parametrize("module", SSL_MODULES)
def test_tls_ca_loads_that_ca_and_still_verifies(module: str, pki: Pki) -> None:
    our_ca = ssl.PEM_cert_to_DER_cert(Path(pki.ca).read_text())
    assert our_ca not in ca_ders(daemon_client_context(module))
    ctx = daemon_client_context(module, "--tls-ca", pki.ca)
    assert ca_ders(ctx) == [our_ca]  # that CA, and only it
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is True


def test_gevent_server_and_client_contexts_make_cooperative_sockets(pki: Pki) -> None:
    """A stdlib SSLSocket blocks the whole gevent hub while it waits (no monkey-patching)."""
    import gevent.ssl

    server = server_ssl_context(pki.cert, pki.key, gevent.ssl)
    client = client_ssl_context(ca_file=pki.ca, ssl_module=gevent.ssl)
    for ctx in (server, client):
        assert ctx.sslsocket_class is gevent.ssl.SSLSocket


def test_tls_ca_from_the_config_file_is_loaded(pki: Pki, tmp_path: Path) -> None:
    config = tmp_path / "candy.cfg"
    config.write_text(
        f'mode = "client";\nwebsocket = "wss://relay.example.net";\ntls_ca = "{pki.ca}";\n'
    )
    ctx = client_kwargs(parse_args(["-c", str(config)]))["ssl_context"]
    assert ca_ders(ctx) == [ssl.PEM_cert_to_DER_cert(Path(pki.ca).read_text())]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname is True
