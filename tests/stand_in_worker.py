"""``python -m tests.stand_in_worker``: a worker process without an engine, for the hive's
leak test. It takes the real worker's flags and answers /ready with a real WorkerReport, in
milliseconds, so a hive can start and lose hundreds of workers in a test."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

from rbee.config import WorkerConfig, from_args


async def main(config: WorkerConfig) -> None:
    # the fields of rbee.link.schemas.WorkerReport, written by hand: importing pydantic would
    # make each start several times slower
    body = json.dumps({"worker_id": config.worker_id, "state": "ready", "model_path": str(config.model_path),
                       "backend": config.backend, "n_ctx": config.n_ctx}).encode()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    assert config.serve.fd is not None
    server = await asyncio.start_server(answer, sock=socket.socket(fileno=config.serve.fd))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(from_args(WorkerConfig, sys.argv[1:])))
