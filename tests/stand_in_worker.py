"""``python -m tests.stand_in_worker``: a worker process without an engine, for the hive's
leak test. It takes the real worker's flags and answers /ready with a real WorkerReport, in
milliseconds, so a hive can start and lose hundreds of workers in a test. With
``STAND_IN_LOAD_S`` set it answers 503 for that many seconds first, like a worker loading;
with ``STAND_IN_DIE_SIGNAL`` (a number) it kills itself with that signal when a job arrives,
like an engine meeting an instruction its CPU does not run. A hive runs it in place of the
real worker when ``RBEE_WORKER_MODULE=tests.stand_in_worker``."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import socket
import sys
import time

from rbee.config import WorkerConfig, from_args


def read_secret() -> str:
    path = os.environ.get("RBEE_TOKEN_FILE")
    if not path:
        return ""
    with open(path) as handle:
        return handle.read().strip()


async def main(config: WorkerConfig) -> None:
    # the fields of rbee.link.schemas.WorkerReport, written by hand: importing pydantic would
    # make each start several times slower
    body = json.dumps({"worker_id": config.worker_id, "state": "ready", "model_path": str(config.model_path),
                       "backend": config.backend, "n_ctx": config.n_ctx}).encode()

    loaded_at = time.monotonic() + float(os.environ.get("STAND_IN_LOAD_S", "0"))
    die = int(os.environ.get("STAND_IN_DIE_SIGNAL", "0"))

    secret = read_secret()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        challenge = next((line.split(b":", 1)[1].strip().decode() for line in head.split(b"\r\n")
                          if line.lower().startswith(b"x-rbee-challenge:")), "")
        if challenge and secret:  # the hive proves this worker on each connection (rbee.link.auth.proof)
            host, port = writer.get_extra_info("sockname")[:2]
            proof = hmac.new(secret.encode(), f"rbee-proof|{challenge}|{host}:{port}".encode(),
                             hashlib.sha256).hexdigest()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Rbee-Proof: %s\r\n"
                         b"Content-Length: %d\r\n\r\n%s" % (proof.encode(), len(body), body))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")  # the request it proved itself for
        if die and head.startswith(b"POST /v1/jobs"):
            signal.signal(die, signal.SIG_DFL)
            os.kill(os.getpid(), die)
        status = b"200 OK" if time.monotonic() >= loaded_at else b"503 Service Unavailable"
        writer.write(b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nConnection: close\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (status, len(body), body))
        await writer.drain()
        writer.close()

    assert config.serve.fd is not None
    server = await asyncio.start_server(answer, sock=socket.socket(fileno=config.serve.fd))
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(from_args(WorkerConfig, sys.argv[1:])))
