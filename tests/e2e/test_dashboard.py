"""Issue 27: the dashboard in a real browser (Debian's headless Chromium through Selenium),
against a persistent queen that `rbee dashboard --no-open` starts, with the real hive, worker
and model behind it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import RBEE, eventually, owner_headers, worker_stops
from tests.hub_server import HubServer, Repo, write_tiny_gguf

pytest.importorskip("selenium.webdriver")
from selenium.webdriver.common.by import By

from tests.browser import CHROMEDRIVER, CHROMIUM, Board, chromium, click, dashboard, open_view, rows, until

pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed")
MODEL = "gemma3-270m"


async def owner_job(board: Board, body: dict[str, Any]) -> list[dict[str, Any]]:
    async with httpx.AsyncClient(base_url=board.base, headers=owner_headers(), timeout=120) as http:
        created = (await http.post("/v1/jobs", json=body)).json()
        found = []
        async with http.stream("GET", created["sse_url"]) as stream:
            async for line in stream.aiter_lines():
                if line.startswith("data: {"):
                    found.append(json.loads(line[6:]))
        return found


async def test_login_fleet_workers_and_a_hive_going_down_and_back(rbee_env: dict[str, str]) -> None:
    async with dashboard(rbee_env) as board:
        events = await owner_job(board, {"prompt": "Hello", "max_tokens": 4, "temperature": 0})
        assert events[-1]["type"] == "end"
        with chromium() as driver:
            driver.get(board.page)  # no token, no cookie: a notice that names nothing
            text = driver.find_element(By.TAG_NAME, "body").text
            assert "Not logged in" in text and "rbee dashboard" in text
            assert "localhost" not in driver.page_source and MODEL not in driver.page_source
            async with httpx.AsyncClient(base_url=board.base) as http:
                assert (await http.get("/dashboard/api/events")).status_code == 401
            driver.get(board.login)
            host = (await until(driver, rows('tr.host[data-host="localhost"][data-state="up"]')))[0]
            assert "RAM" in host["text"] and "cores" in host["text"] and "linux" in host["text"]
            assert "#login" not in driver.current_url  # the token left the address bar
            driver.get(f"{board.page}#workers")
            worker = (await until(driver, rows("tr.worker")))[0]
            assert f'class="model">{MODEL}<' in worker["html"] and "tokens/s" in worker["text"]
            assert re.search(r'<polyline points="[\d.]+,[\d.]+', worker["html"])  # the rate chart has points

            async with httpx.AsyncClient(base_url=board.base, headers=owner_headers()) as http:
                pid = (await http.get("/v1/hives")).json()["hives"][0]["pid"]
            driver.get(f"{board.page}#fleet")
            os.kill(pid, signal.SIGSTOP)
            try:  # three missed beats of 0.5 s: down, with the reason, without a reload
                down = (await until(driver, rows('tr.host[data-host="localhost"][data-state="down"]'), 10))[0]
                assert "missed 3 heartbeats" in down["text"]
            finally:
                os.kill(pid, signal.SIGCONT)
            await until(driver, rows('tr.host[data-host="localhost"][data-state="up"]'), 10)
            assert driver.execute_script("return performance.getEntriesByType('navigation').length") == 1

            driver.set_window_size(390, 844)  # a phone's width: rows stack, nothing runs off the side
            await until(driver, lambda d: d.execute_script(
                "return document.documentElement.scrollWidth <= window.innerWidth + 1"), 5)

            await until(driver, click('button[data-post="api/logout"]'))
            await until(driver, lambda d: "Not logged in" in d.find_element(By.TAG_NAME, "body").text, 10)
            assert "localhost" not in driver.page_source


async def test_playground_streams_and_jobs_view_cancels(rbee_env: dict[str, str]) -> None:
    # chromium, the playground and a 3000-token job share two cores here: with the suite's 0.5 s
    # beat the hive missed its 1.5 s deadline in 1 of 5 runs and the job ended `peer_down`. This
    # test is about streaming and cancel, not heartbeats (the test above covers a hive going down)
    async with dashboard({**rbee_env, "RBEE_HEARTBEAT_INTERVAL": "1.0"}) as board:
        with chromium() as driver:
            await open_view(driver, board, "playground")
            form = driver.find_element(By.ID, "chat-form")
            for name, value in (("max_tokens", "48"), ("temperature", "0")):
                field = form.find_element(By.NAME, name)
                field.clear()
                field.send_keys(value)
            form.find_element(By.NAME, "prompt").send_keys("Write a short story about a bee.")
            driver.execute_script("""
                window.lengths = [];
                new MutationObserver(() => {
                  const answer = document.querySelector('#chat-turns li.assistant:last-child');
                  if (answer) window.lengths.push(answer.textContent.length);
                }).observe(document.getElementById('chat-turns'),
                           {subtree: true, childList: true, characterData: true});""")
            form.find_element(By.ID, "chat-send").click()
            stats = driver.find_element(By.ID, "chat-stats")
            await until(driver, lambda d: re.search(r"tokens/s \((stop|length)\)", stats.text), 60)
            assert re.match(r"\d+ tokens, [\d.]+ tokens/s", stats.text), stats.text
            lengths = driver.execute_script("return window.lengths")
            grown = sorted({n for n in lengths if n > 0})
            assert len(grown) >= 5, lengths  # the answer grew token by token, not all at once
            answer = driver.find_element(By.CSS_SELECTOR, "#chat-turns li.assistant").text
            assert answer.strip() and len(answer) == grown[-1]
            assert "hive:localhost" in driver.find_element(By.ID, "chat-narration").text

            # a long job from another client; cancelled from the Jobs view, it ends at the worker
            process = await asyncio.create_subprocess_exec(
                *RBEE, "infer", "--max-tokens", "3000", "--temperature", "0", "Count to one thousand.",
                env=board.env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                driver.get(f"{board.page}#jobs")
                running = await until(driver, lambda d: d.execute_script(
                    "return [...document.querySelectorAll('tr.job')].filter("
                    "r => Number(r.querySelector('.tokens').textContent) > 5).map(r => r.dataset.job)[0]"), 60)
                row = f'tr.job[data-job="{running}"]'
                cancel = driver.find_element(By.CSS_SELECTOR, f"{row} button.cancel")
                counted = int(driver.find_element(By.CSS_SELECTOR, f"{row} .tokens").text)
                await until(driver, lambda d: int(d.find_element(By.CSS_SELECTOR, f"{row} .tokens").text) > counted)
                cancel.click()  # the same button: a view is updated in place, never swapped under the pointer
                _, stderr = await asyncio.wait_for(process.communicate(), 30)
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
            assert process.returncode != 0 and "cancel" in stderr.decode(), stderr.decode()
            await until(driver, rows("#jobs tbody tr td[colspan]"), 10)  # "No jobs running."
            async with httpx.AsyncClient(base_url=board.base, headers=owner_headers()) as http:
                worker_url = (await http.get("/v1/workers")).json()["workers"][0]["url"]
            await worker_stops(worker_url, most=3000)


async def test_a_pull_shows_its_progress_to_the_end(rbee_env: dict[str, str], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    models = Path(rbee_env["RBEE_MODELS_DIR"])
    shutil.rmtree(models / "board-pulled", ignore_errors=True)  # a shared catalog's leftover
    with HubServer() as server:
        data = write_tiny_gguf(tmp_path / "board-pulled.gguf", megabytes=24).read_bytes()
        server.repos["acme/board-GGUF"] = Repo(files={"board-pulled.gguf": data})
        for key, value in {"HF_ENDPOINT": server.url, "HF_HUB_DISABLE_XET": "1",
                           "HF_HOME": str(tmp_path / "hf")}.items():
            monkeypatch.setenv(key, value)
            rbee_env[key] = value
        try:
            async with dashboard(rbee_env) as board:
                with chromium() as driver:
                    await open_view(driver, board, "models")
                    form = driver.find_element(By.ID, "pull-form")
                    form.find_element(By.NAME, "ref").send_keys("hf:acme/board-GGUF:board-pulled.gguf")
                    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
                    await until(driver, rows("li.pull progress"), 30)  # the bar, while it runs or done
                    done = (await until(driver, rows('li.pull[data-state="done"]'), 60))[0]
                    assert '<progress max="100" value="100">' in done["html"] and "100 %" in done["text"]
                    assert "MB of" in done["text"]
                    await until(driver, rows('tr.model[data-model="board-pulled"]'), 15)  # the next heartbeat
                await eventually(lambda: (models / "board-pulled").exists(), timeout=5)
        finally:
            shutil.rmtree(models / "board-pulled", ignore_errors=True)
