"""Issue 27.2: what the dashboard's views show, built from reports and jobs without a server:
rates from heartbeats, the log from narration, pull progress, memory bars, and markup that
escapes whatever a host reports."""

from __future__ import annotations

import asyncio

from rbee.link import events
from rbee.link.jobs import Job
from rbee.link.schemas import HiveReport, HiveView, Load, WorkerView
from rbee.queen.dashboard import views
from rbee.queen.dashboard.feed import Feed, Sample
from rbee.queen.dashboard.routes import render


def worker(worker_id: str, tokens: int, **extra: object) -> WorkerView:
    return WorkerView(worker_id=worker_id, state="up", model_path="/m/gemma.gguf", backend="llama-cpp",
                      tokens_generated=tokens, **extra)  # type: ignore[arg-type]


def report(*workers: WorkerView) -> HiveReport:
    return HiveReport(name="bee", workers=list(workers))


def test_worker_rates_come_from_the_tokens_counted_between_heartbeats() -> None:
    feed = Feed(window_s=10)
    feed.heartbeat("bee", report(worker("w-1", 100)), now=0.0)
    assert feed.rate("bee", "w-1") == 0.0  # one beat: no rate yet
    feed.heartbeat("bee", report(worker("w-1", 150)), now=2.0)
    assert feed.rate("bee", "w-1") == 25.0
    feed.heartbeat("bee", report(worker("w-1", 150)), now=4.0)
    assert feed.rate("bee", "w-1") == 0.0  # idle now
    feed.heartbeat("bee", report(worker("w-1", 150)), now=13.0)
    assert [s.at for s in feed.rates[("bee", "w-1")]] == [4.0, 13.0]  # older than the window: gone
    feed.heartbeat("bee", report(), now=15.0)
    assert ("bee", "w-1") not in feed.rates  # a worker no longer reported leaves the chart


def test_the_sparkline_spans_the_window_and_scales_to_its_peak() -> None:
    assert views.sparkline([], now=100, window_s=60) == ""
    points = views.sparkline([Sample(40, 0.0), Sample(70, 10.0), Sample(100, 5.0)], now=100, window_s=60,
                             width=120, height=30)
    assert points == "0.0,30.0 60.0,0.0 120.0,15.0"
    flat = views.sparkline([Sample(100, 0.2)], now=100, window_s=60, width=120, height=30)
    assert flat == "120.0,24.0"  # under 1 token/s the scale stays at 1: an idle worker is a low line


def test_a_host_row_has_a_bar_per_memory_pool() -> None:
    devices = {"os": "linux", "arch": "x86_64",
               "cpu": {"cores": 16, "ram_total": 64_000, "ram_free": 16_000, "load": 12.5},
               "gpus": [{"kind": "cuda", "name": "H200", "memory_total": 140_000, "memory_free": 100_000},
                        {"kind": "metal", "name": "M2", "memory_total": 64_000, "memory_free": 1, "unified": True}]}
    row = views.host(HiveView(name="gpu-box", state="down", reason="missed 3 heartbeats", devices=devices))
    assert not row.up and row.platform == "linux/x86_64" and row.cores == 16 and row.cpu_load == 12.5
    assert [(m.name, m.used, m.free) for m in row.memory] == [("RAM", 48_000, 16_000), ("H200", 40_000, 100_000)]
    assert views.host(HiveView(name="new", state="not running")).memory == []


async def test_jobs_in_flight_and_pulls_are_read_from_the_queens_jobs() -> None:
    running = Job("job-a", "queen")
    running.info.update(kind="infer", model="gemma3-270m", node="bee")
    running.created = 0.0
    running.emit(events.narration("queen", "route", "job goes to hive:bee"))
    for index in range(4):
        running.emit(events.token(index, "x"))
    running.first_token_at = 0.5
    done = Job("job-b", "queen")
    done.info.update(kind="infer")
    done.emit(events.end(1, 0.1, "stop"))
    rows = views.jobs([running, done, Job("job-c", "queen")], now=2.5)
    assert [(r.id, r.tokens, r.ttft_ms, r.tokens_per_s, r.node) for r in rows] == [("job-a", 4, 500.0, 2.0, "bee")]

    pull = Job("job-p", "queen")
    pull.info.update(kind="pull", ref="hf:a/b:c.gguf", node="bee")
    pull.emit(events.narration("hive:bee", "download", "downloading hf:a/b (8.0 MB)", bytes=0, total=8_000_000))
    pull.emit(events.narration("hive:bee", "download", "3.0 of 8.0 MB", bytes=3_000_000, total=8_000_000))
    assert [(p.state, p.percent) for p in views.pulls([pull])] == [("running", 37)]
    pull.emit(events.narration("hive:bee", "verify", "checking sha256"))
    pull.emit(events.end(0, 1.0, "done"))
    assert [(p.state, p.percent, p.message) for p in views.pulls([pull])] == [("done", 100, "checking sha256")]
    failed = Job("job-f", "queen")
    failed.info.update(kind="pull")
    failed.emit(events.error("no_space", "the disk is full", "hive:bee"))
    assert [(p.state, p.message) for p in views.pulls([failed])] == [("failed", "the disk is full")]


async def test_narration_becomes_one_log_with_the_host_it_came_from() -> None:
    feed = Feed()
    job = Job("job-a", "queen")
    job.watch = feed.observe
    job.info["node"] = "bee"
    job.emit(events.narration("queen", "route", "job goes to hive:bee"))
    job.emit(events.narration("hive:bee", "spawn", "starting worker:w-1"))
    job.emit(events.token(0, "hi"))
    job.emit(events.narration("worker:w-1", "template", "chat formatted"))
    assert [(line.seq, line.host, line.actor) for line in feed.log] == [
        (1, "queen", "queen"), (2, "bee", "hive:bee"), (3, "bee", "worker:w-1")]
    assert [line.seq for line in feed.lines_after(1)] == [2, 3]
    woke = asyncio.ensure_future(feed.wait(5))
    await asyncio.sleep(0)
    job.emit(events.end(1, 0.1, "stop"))  # an end wakes the pages
    await asyncio.wait_for(woke, 1)


def test_markup_escapes_what_hosts_report() -> None:
    hostile = "<script>alert(1)</script>"
    row = views.host(HiveView(name="bee", state="up", reason=hostile, engine=f'x" onmouseover="{hostile}'))
    html = render("fleet.html", hosts=[row])
    assert "<script>" not in html and "&lt;script&gt;" in html and 'onmouseover="' not in html
    rendered = render("workers.html", workers=views.workers(
        [HiveView(name="bee", state="up", workers=[worker(hostile, 0, load=Load(slots=4, slots_busy=1))])],
        Feed(), {}))
    assert "<script>" not in rendered and "1/4" in rendered
