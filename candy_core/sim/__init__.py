"""A deterministic in-memory network for whole Candy scenarios (DESIGN.md: "a simulator").

A :class:`Simulation` wires real cores together -- one :class:`~candy_core.server.RelayServer`,
any number of :class:`~candy_core.client.Client` objects and a STUN server -- over a virtual
network with a virtual clock and simulated NATs. Nothing reads the real clock or the operating
system's random source: every random choice (client and server cores, NAT ports, packet loss)
comes from :class:`random.Random` instances seeded from the simulation's ``seed``, so a
scenario replays identically and runs in milliseconds.

The pieces, one module each:

- :mod:`~candy_core.sim.simulation`: :class:`Simulation` and :class:`SimClient`, and the
  glue a shell would be (draining the cores with :mod:`candy_core.drain`, arming timers);
- :mod:`~candy_core.sim.network`: the virtual clock, links, UDP routing and "TCP" pipes;
- :mod:`~candy_core.sim.nat`: :class:`Nat`, the NAT models;
- :mod:`~candy_core.sim.packets`: :func:`icmp` and :func:`icmp_seq`, test packets.

How they behave:

- **Clock**: :attr:`Simulation.now` starts at 0 and only moves inside :meth:`Simulation.run`
  (and :meth:`Simulation.run_until`), which process a queue of timed actions: bytes arriving
  on a "TCP" pipe, datagrams arriving, and each core's timer (``next_deadline()`` /
  ``handle_timer(now)``). The wall clock handed to the cores is ``WALL_EPOCH + now``.
- **TCP**: each client talks to the server over an in-memory pipe carrying the raw stream
  bytes (HTTP upgrade, WebSocket frames) in order, reliably, after the link's latency. The
  glue does what a shell does: it opens a pipe when ``take_connect_request()`` says so,
  closes it on ``take_close_request()`` or ``connections_to_close()``.
- **UDP**: datagrams travel between sockets identified by ``(ip, port)``. A client behind a
  :class:`Nat` has its source translated on the way out and inbound datagrams filtered per
  the NAT's kind (RFC 4787 terms). Clients behind the *same* :class:`Nat` object share a LAN
  and reach each other's ``lan_ip`` directly, untranslated. A client without a NAT sits on
  the public network with ``lan_ip`` as its public address. Datagrams to any other address
  (another LAN's private address, say) are dropped. Every link has a latency and a loss
  rate (:meth:`Simulation.set_link`); loss applies to UDP only.

A minimal scenario::

    sim = Simulation(seed=1)
    sim.add_server("secret")
    sim.add_stun()
    a = sim.add_client("a", "192.168.1.2", nat=sim.add_nat("198.51.100.1", "full_cone"))
    b = sim.add_client("b", "192.168.2.2", nat=sim.add_nat("198.51.100.2", "full_cone"))
    sim.run_until(lambda: a.connected and b.connected, timeout=5)
    a.send_packet(icmp(a.ip, b.ip, 1))
    sim.run(1)
    assert b.received
"""

from candy_core.sim.nat import NAT_KINDS, Nat
from candy_core.sim.network import DEFAULT_LATENCY, WALL_EPOCH
from candy_core.sim.packets import icmp, icmp_seq
from candy_core.sim.simulation import SimClient, Simulation

__all__ = [
    "DEFAULT_LATENCY",
    "NAT_KINDS",
    "WALL_EPOCH",
    "Nat",
    "SimClient",
    "Simulation",
    "icmp",
    "icmp_seq",
]
