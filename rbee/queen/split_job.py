"""A job split across hives, once ``rbee.queen.split`` has planned it: each helper hive starts a
share (llama.cpp's RPC server, fenced in its own network namespace behind a unix socket); on the
main hive's host the queen opens one unix socket per share, in that hive's run folder, and carries
each connection to the share over the SSH connections it already holds (or directly, for this
machine); the main hive gets the job with those sockets; and at the end everything is stopped.

While the job runs, a helper whose hive goes down, whose share stops (SIGSTOP) or ends, or whose
path breaks ends the job with ``peer_down`` naming that helper; tearing its share down then makes
the main worker's RPC calls fail, so nothing waits on a share that is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rbee.errors import PeerDownError, PeerError, RbeeError
from rbee.link import events
from rbee.link.client import run_job
from rbee.link.jobs import Job
from rbee.link.peers import PeerState
from rbee.link.private import Dial, forward, serve_unix
from rbee.link.relay import relay
from rbee.link.schemas import HiveReport, JobRequest, PullRequest, SharePart, ShareRequest, ShareView
from rbee.queen.scheduler import hive_body
from rbee.queen.split import Split

if TYPE_CHECKING:
    from rbee.queen.service import Queen

log = logging.getLogger("rbee.queen.split")

#: how often the queen looks at the helpers while a split job runs
WATCH_INTERVAL_S = 0.25
#: how long a share no job holds may be listed by its hive before the queen stops it
STRAY_GRACE_S = 10.0
Closer = Callable[[], Awaitable[None]]


class ShareLedger:
    """The shares this queen's split jobs hold, and the strays: a share a hive still lists that
    no job holds (its job's teardown could not reach a hive that hung, or the queen restarted)
    is stopped once it has been listed for ``grace`` seconds, so nothing outlives its job."""

    def __init__(self, grace: float = STRAY_GRACE_S) -> None:
        self.grace = grace
        self.held: set[str] = set()
        self.first_seen: dict[str, dict[str, float]] = {}  # hive → share id → when first listed unheld

    def hold(self, share_id: str) -> None:
        self.held.add(share_id)

    def release(self, share_id: str) -> None:
        self.held.discard(share_id)

    def strays(self, hive: str, report: HiveReport, now: float | None = None) -> list[str]:
        """The shares ``hive``'s report lists that no job has held for ``grace`` seconds."""
        now = time.monotonic() if now is None else now
        unheld = {share.share_id for share in report.shares} - self.held
        seen = self.first_seen.setdefault(hive, {})
        for share_id in set(seen) - unheld:
            del seen[share_id]
        for share_id in unheld:
            seen.setdefault(share_id, now)
        return sorted(share_id for share_id, first in seen.items() if now - first >= self.grace)


class SplitJob:
    def __init__(self, queen: Queen, job: Job, request: JobRequest, plan: Split) -> None:
        self.queen = queen
        self.job = job
        self.request = request
        self.plan = plan
        self.shares: list[tuple[str, str, str]] = []  # (helper hive, share id, its socket there)
        self.started: dict[str, float] = {}  # share id → when its hive said it was up (monotonic)
        self.closers: list[Closer] = []

    async def run(self) -> None:
        plan, job = self.plan, self.job
        job.narrate("split", plan.describe())
        job.info["node"] = plan.main.hive
        ref = self.gguf_ref()
        holds, first = [], plan.main.layers  # what each helper's share holds
        for share in plan.helpers:
            holds.append(SharePart(layers=(first, share.layers), output=share.output))
            first += share.layers
        try:
            await asyncio.gather(*(self.provision(share.hive, ref, part)
                                   for share, part in zip(plan.helpers, holds, strict=True)))
            for share, part in zip(plan.helpers, holds, strict=True):
                asked = ShareRequest(model=plan.model, bytes=share.bytes, ref=ref, layers=part.layers,
                                     output=part.output)
                answer = await self.queen.on_hive(share.hive, "POST", "/v1/shares", asked.model_dump(mode="json"))
                view = ShareView.model_validate(answer["share"])
                self.shares.append((share.hive, view.share_id, view.socket))
                self.started[view.share_id] = time.monotonic()
                self.queen.shares.hold(view.share_id)
                job.narrate("split", f"{share.hive} serves {share.layers} layers of {plan.model} over RPC"
                                     + (f"; {view.cache}" if view.cache else ""))
            hive = await self.queen.hive_named(plan.main.hive, job.narrate)
            folder = self.folder_on_main()
            sockets = []
            for index, (helper, _, path) in enumerate(self.shares):
                listen = f"{folder}/{index}.sock"
                await self.listen(plan.main.hive, listen, self.dialer(helper, path), helper)
                sockets.append(listen)
            gpu_layers = sum(share.layers for share in plan.helpers) + 1  # the output projection counts
            parts = [share.layers + (1 if share.output else 0) for share in plan.helpers]
            body = hive_body(self.request, self.queen.fleet.inventory, plan.main.hive)
            body.update(ctx=plan.n_ctx, keep_alive=0, split={
                "sockets": sockets, "gpu_layers": gpu_layers, "tensor_split": [p / sum(parts) for p in parts],
                "bytes": plan.main.bytes, "helpers": [share.hive for share in plan.helpers]})
            with self.queen.hives.relaying(hive, job):
                await self.race(relay(job, self.queen.hive_link(hive), body))
        finally:
            await self.teardown()

    def gguf_ref(self) -> str:
        """What the helpers pull: the logical model's GGUF form, else the job's own reference."""
        logical = self.queen.fleet.inventory.models.get(self.request.model) if self.request.model else None
        forms = logical.forms() if logical is not None else {}
        return forms.get("gguf") or self.request.model or self.plan.model

    async def provision(self, helper: str, ref: str, part: SharePart) -> None:
        """The helper's own copy of the model, pulled as any job's is, and ``part`` of it written
        into its RPC cache (both narrated with progress), so its share's large tensors are read
        there rather than sent."""
        hive = await self.queen.hive_named(helper, self.job.narrate)
        asked = PullRequest(ref=ref, share=part)
        pulling = run_job(self.queen.hive_link(hive), asked.model_dump(mode="json"), "/v1/catalog/jobs")
        with self.queen.hives.relaying(hive, self.job):
            async with contextlib.aclosing(pulling) as pull:
                async for event in pull:
                    self.narrate_pull(helper, ref, event)

    def narrate_pull(self, helper: str, ref: str, event: events.Event) -> None:
        """A helper's pull event in the job's narration (its progress, under the helper's name);
        its failure as the job's."""
        if event.type == events.NARRATION and event["action"] in ("download", "provision", "verify", "cache"):
            extra = {k: v for k, v in event.fields.items() if k not in ("type", "actor", "action", "message")}
            self.job.narrate(event["action"], f"{helper}: {event['message']}", **extra)
        elif event.type == events.ERROR:
            raise PeerError(f"{helper} could not get {ref} for its share of the split: {event['message']}",
                            code=event["code"], actor=f"hive:{helper}")

    async def race(self, running: Awaitable[object]) -> None:
        """The job, ended early by the first helper found down."""
        main = asyncio.ensure_future(running)
        watch = asyncio.ensure_future(self.watch())
        try:
            done, _ = await asyncio.wait({main, watch}, return_when=asyncio.FIRST_COMPLETED)
            if watch in done:
                main.cancel()
                with contextlib.suppress(asyncio.CancelledError, RbeeError):
                    await main
                watch.result()  # raises PeerDownError
            main.result()
        finally:
            for task in (main, watch):
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError, RbeeError):
                await asyncio.gather(main, watch, return_exceptions=True)

    async def watch(self) -> None:
        while True:
            self.check_helpers()
            await asyncio.sleep(WATCH_INTERVAL_S)

    def check_helpers(self) -> None:
        """PeerDownError naming the first helper that is down, stopped, gone or cut off."""
        for helper, share_id, _ in self.shares:
            what = self.holding(helper)
            peer = self.queen.hives.get(helper)
            if peer is not None and peer.state == PeerState.DOWN:
                raise PeerDownError(f"{what} is down ({peer.reason})")
            report = peer.report if peer is not None else None
            share = next((s for s in report.shares if s.share_id == share_id), None) if report else None
            if share is not None and share.state != "up":
                raise PeerDownError(f"{what} lost its share ({share.state})")
            # a beat may have been made before the share started; three in a row without it are not
            if share is None and time.monotonic() - self.started[share_id] > 3 * self.queen.config.heartbeat_interval:
                raise PeerDownError(f"{what} lost its share (its hive no longer lists it)")

    def lost(self, helper: str, why: str) -> None:
        """End the job now, naming ``helper``: a connection the main worker held to its share ended
        at the share's end (it died, its hive did and took it along, or the path to it broke), or
        could not be opened. The queen hears that before it closes the worker's end, so this error
        is the job's first, before the worker's abort is reported."""
        self.job.fail("peer_down", f"{self.holding(helper)} {why}")

    def holding(self, helper: str) -> str:
        """``helper`` as the job's errors name it: with what it holds."""
        layers = next(share.layers for share in self.plan.helpers if share.hive == helper)
        return f"{helper}, which holds {layers} layers of {self.plan.model} for this job,"

    def folder_on_main(self) -> str:
        """The run folder of the main hive, where its hive accepts a split's sockets."""
        node = self.plan.main.hive
        if self.queen.is_local(node):
            return str(self.queen.config.home / "run" / "splits" / self.job.id)
        host = self.queen.fleet.hosts.get(node)
        if host is None or not host.home:
            raise PeerDownError(f"{node} is not attached to this queen (`rbee fleet up`)")
        return f"{host.home}/run/splits/{self.job.id}"

    def dialer(self, node: str, path: str) -> Dial:
        """How the queen opens a connection to a unix socket on ``node``."""
        if self.queen.is_local(node):
            return lambda: asyncio.open_unix_connection(path)

        async def over_ssh() -> Any:
            conn = await self.queen.fleet.hosts[node].connected()
            return await conn.open_unix_connection(path, encoding=None)

        return over_ssh

    async def listen(self, node: str, path: str, dial: Dial, helper: str) -> None:
        """A unix socket at ``path`` on ``node`` whose every connection is spliced to ``dial()``."""
        def unreachable(exc: Exception) -> None:
            log.warning("split %s: cannot reach the share on %s: %s", self.job.id, helper, exc)
            self.lost(helper, "cannot be reached: its share's socket does not answer")

        async def handle(reader: Any, writer: Any) -> None:
            # llama.cpp's client opens and closes several over a load; the share never closes one first
            # unless it is gone (or the path to it is), and then the main worker is about to abort
            await forward(reader, writer, dial, unreachable,
                          lambda: self.lost(helper, "is gone: its share closed the main worker's connection"))

        if self.queen.is_local(node):
            server = await serve_unix(Path(path), handle)

            async def close_local() -> None:
                server.close()
                shutil.rmtree(Path(path).parent, ignore_errors=True)

            self.closers.append(close_local)
            return
        conn = await self.queen.fleet.hosts[node].connected()
        folder_path = path.rsplit("/", 1)[0]
        async with conn.start_sftp_client() as sftp:
            await sftp.makedirs(folder_path, exist_ok=True)
            await sftp.chmod(folder_path, 0o700)
        listener = await conn.start_unix_server(lambda: handle, path, encoding=None)

        async def close_remote() -> None:
            listener.close()
            with contextlib.suppress(Exception):
                async with conn.start_sftp_client() as sftp:
                    await sftp.remove(path)
                    await sftp.rmdir(folder_path)

        self.closers.append(close_remote)

    async def teardown(self) -> None:
        """Every share stopped (which also ends a main worker stuck on one) and every path closed."""
        for helper, share_id, _ in self.shares:
            try:
                await self.queen.on_hive(helper, "DELETE", f"/v1/shares/{share_id}")
            except RbeeError as exc:  # a hive that is gone took its share along; one that hung, later
                log.warning("split %s: could not stop the share on %s (stopped once it reports again): %s",
                            self.job.id, helper, exc)
            self.queen.shares.release(share_id)
        for close in reversed(self.closers):
            with contextlib.suppress(Exception):
                await close()
