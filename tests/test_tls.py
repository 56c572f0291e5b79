"""wss:// end to end on 127.0.0.1: the asyncio server and client over TLS, and `websockets`.

A throw-away CA and a server certificate for ``localhost``/127.0.0.1 are made with
``cryptography`` in the test's temporary directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
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
from shells.common import client_ssl_context, server_ssl_context

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


def make_pki(directory: Path, dns: str = "localhost", tag: str = "") -> Pki:
    """A CA and a server certificate it signed, for ``dns`` and 127.0.0.1, as PEM files."""
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
                [x509.DNSName(dns), x509.IPAddress(ipaddress.IPv4Address("127.0.0.1"))]
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


@contextlib.asynccontextmanager
async def tls_relay(pki: Pki) -> AsyncIterator[tuple[Server, list[Any]]]:
    events: list[Any] = []
    server = Server(
        ServerConfig.from_strings(PASSWORD, NETWORK),
        "127.0.0.1",
        0,
        ssl_context=server_ssl_context(pki.cert, pki.key),
        on_event=events.append,
    )
    async with server:
        yield server, events


@contextlib.asynccontextmanager
async def tls_client(
    port: int, ctx: ssl.SSLContext, host: str = "localhost"
) -> AsyncIterator[tuple[Client, list[Any]]]:
    events: list[Any] = []
    config = ClientConfig(password=PASSWORD, name="tls", host=host, port=port)
    client = Client(config, ssl_context=ctx, tun=False, on_event=events.append)
    async with client:
        yield client, events


async def wait_for_event(events: list[Any], kind: type, timeout: float = 4.0) -> Any:
    async def poll() -> Any:
        while True:
            for event in events:
                if isinstance(event, kind):
                    return event
            await asyncio.sleep(0.02)

    return await asyncio.wait_for(poll(), timeout)


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
        async with tls_relay(pki) as (server, _):
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
                await asyncio.sleep(0.1)  # b's AUTH has reached the relay
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
            events: list[Any] = []
            async with Client(config, tun=False, on_event=events.append) as client:
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
        events: list[Any] = []
        config = ClientConfig(password=PASSWORD, host="a" * 70 + ".example", port=443)
        ctx = client_ssl_context(verify=True)
        async with Client(config, ssl_context=ctx, tun=False, on_event=events.append) as client:
            await wait_for_event(events, Disconnected)
            await wait_for_event(events, Reconnecting)
            assert not client.core.authenticated

    run(scenario)
