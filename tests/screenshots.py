"""Screenshots of every dashboard view, for docs/dashboard/ (run by scripts/screenshots).

A queen of its own (a temporary RBEE_HOME, the default model), a few jobs so the views have
something to show, two long ones running while the Workers and Jobs views are taken, a chat
in the playground; then everything is stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import tempfile
from pathlib import Path

from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.browser import chromium, click, dashboard, rows, until
from tests.helpers import RBEE

OUT = Path(__file__).resolve().parent.parent / "docs" / "dashboard"


async def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="rbee-shots-") as home:
        env = {**os.environ, "RBEE_HOME": home, "RBEE_HEARTBEAT_INTERVAL": "0.5", "PYTHONUNBUFFERED": "1"}
        async with dashboard(env) as board:
            for prompt in ("The bee said", "Honey is made by"):
                await infer(board.env, prompt, 48)
            with chromium() as driver:
                driver.get(board.login)
                await until(driver, rows('tr.host[data-state="up"]'))
                await shoot(driver, board.page, "fleet")
                long_jobs = [await start_infer(board.env, f"Count slowly from one to {n}.", 400) for n in (500, 900)]
                try:
                    await until(driver, lambda d: d.execute_script(
                        "return [...document.querySelectorAll('tr.job .tokens')]"
                        ".filter(cell => Number(cell.textContent) > 10).length == 2"), 60)
                    await shoot(driver, board.page, "jobs")
                    await shoot(driver, board.page, "workers")
                    driver.get(f"{board.page}#jobs")
                    for _ in long_jobs:  # cancelled from the page, so the worker stops them at once
                        await until(driver, click("tr.job button.cancel"))
                    await until(driver, rows("#jobs tbody tr td[colspan]"))
                finally:
                    for process in long_jobs:
                        with contextlib.suppress(ProcessLookupError):
                            process.kill()
                        await process.wait()
                driver.get(f"{board.page}#playground")
                form = driver.find_element(By.ID, "chat-form")
                for name, value in (("max_tokens", "60"), ("temperature", "0")):
                    form.find_element(By.NAME, name).clear()
                    form.find_element(By.NAME, name).send_keys(value)
                form.find_element(By.NAME, "prompt").send_keys("Why do bees make honey?")
                form.find_element(By.ID, "chat-send").click()
                await until(driver, lambda d: "tokens/s (" in d.find_element(By.ID, "chat-stats").text, 60)
                await shoot(driver, board.page, "playground", navigate=False)
                await shoot(driver, board.page, "models")
                await shoot(driver, board.page, "log")
                driver.set_window_size(390, 844)
                await shoot(driver, board.page, "fleet", name="phone")
    print(f"screenshots written to {OUT}", file=sys.stderr)


async def shoot(driver: WebDriver, page: str, view: str, *, name: str = "", navigate: bool = True) -> None:
    if navigate:
        driver.get(f"{page}#{view}")
    await until(driver, rows(f"section#{view}"))
    await asyncio.sleep(0.3)  # let a fresh fragment paint: a picture, not a test
    driver.save_screenshot(str(OUT / f"{name or view}.png"))


async def start_infer(env: dict[str, str], prompt: str, tokens: int) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        *RBEE, "infer", "--max-tokens", str(tokens), prompt, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


async def infer(env: dict[str, str], prompt: str, tokens: int) -> None:
    process = await start_infer(env, prompt, tokens)
    await asyncio.wait_for(process.wait(), 120)


if __name__ == "__main__":
    asyncio.run(main())
