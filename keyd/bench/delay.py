"""A TCP proxy on loopback that delays every chunk by a fixed time each way: Vault "1 ms away".

``python -m keyd.bench.delay LISTEN_PORT TARGET_PORT DELAY_SECONDS`` (both on 127.0.0.1) forwards
each connection to the target; every chunk read from either side is written to the other
``DELAY_SECONDS`` later (order kept: every chunk waits the same time), so a request and its answer
cross the proxy with one round trip of 2 x DELAY added, as to a Vault on another machine. It prints
``ready`` once listening. Used by ``keyd bench --compare`` for its ``keyd-transit-1ms`` target.
"""

from __future__ import annotations

import asyncio
import sys


class _Pipe(asyncio.Protocol):
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.transport: asyncio.Transport | None = None
        self.peer: _Pipe | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a TCP transport

    def data_received(self, data: bytes) -> None:
        asyncio.get_running_loop().call_later(self.delay, self._forward, data)

    def _forward(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.pending.append(data)
            return
        if not peer.transport.is_closing():
            peer.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None:
            asyncio.get_running_loop().call_later(self.delay, peer.transport.close)


async def serve(listen_port: int, target_port: int, delay: float) -> None:
    loop = asyncio.get_running_loop()

    def accept() -> _Pipe:
        inbound = _Pipe(delay)

        async def connect() -> None:
            try:
                _, outbound = await loop.create_connection(lambda: _Pipe(delay), "127.0.0.1", target_port)
            except OSError:
                if inbound.transport is not None:
                    inbound.transport.close()
                return
            outbound.peer, inbound.peer = inbound, outbound
            for data in inbound.pending:
                outbound.transport.write(data)  # type: ignore[union-attr]  # connected just above
            inbound.pending.clear()

        loop.create_task(connect())  # noqa: RUF006 - lives as long as the connection's callbacks
        return inbound

    server = await loop.create_server(accept, "127.0.0.1", listen_port)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    listen_port, target_port, delay = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    asyncio.run(serve(listen_port, target_port, delay))


if __name__ == "__main__":
    main()
