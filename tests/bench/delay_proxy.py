"""A TCP proxy that adds a fixed delay each way, like a service tens of milliseconds away.

    python tests/bench/delay_proxy.py --rtt-ms 40 LISTEN_PORT:HOST:PORT [LISTEN_PORT:HOST:PORT ...]

Every byte is held for half the round trip in each direction; throughput is not limited
(reads and writes are queued with their due time, in order), so only latency changes.
Prints `ready` once it listens. Runs in its own process, so it never competes with the
process it serves for the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import time


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    """Copy reader to writer, each piece sent `delay` seconds after it arrived, in order."""
    due: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def send() -> None:
        while True:
            at, data = await due.get()
            if not data:
                break
            wait = at - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    sender = asyncio.create_task(send())
    try:
        while data := await reader.read(1 << 16):
            due.put_nowait((time.monotonic() + delay, data))
    except ConnectionError:
        pass
    due.put_nowait((0.0, b""))
    try:
        await sender
    except ConnectionError:
        pass


async def serve(listen: int, host: str, port: int, delay: float) -> asyncio.Server:
    async def connect(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(host, port)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pump(client_reader, server_writer, delay), pump(server_reader, client_writer, delay))

    return await asyncio.start_server(connect, "127.0.0.1", listen)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtt-ms", type=float, required=True, help="round trip added (half each way)")
    parser.add_argument("routes", nargs="+", help="LISTEN_PORT:HOST:PORT")
    args = parser.parse_args()
    servers = []
    for route in args.routes:
        listen, host, port = route.split(":")
        servers.append(await serve(int(listen), host, int(port), args.rtt_ms / 2000))
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())
