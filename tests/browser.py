"""A real browser on rbee's dashboard: headless Chromium (Debian's `chromium` and
`chromium-driver`) through Selenium, and `rbee dashboard` starting the queen it logs in to.
Shared by the browser tests and the screenshot script (scripts/screenshots)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from selenium import webdriver
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import WebDriverWait

from rbee.link.spawn import bind_loopback
from tests.helpers import run_rbee

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@dataclass(frozen=True)
class Board:
    base: str  # the queen
    login: str  # the URL `rbee dashboard` printed
    env: dict[str, str]

    @property
    def page(self) -> str:
        return f"{self.base}/dashboard/"


@contextlib.asynccontextmanager
async def dashboard(rbee_env: dict[str, str]) -> AsyncIterator[Board]:
    """`rbee dashboard --no-open` on a free port: it starts a persistent queen and prints the
    login URL last; `rbee queen stop` ends it all."""
    sock = bind_loopback()
    port = sock.getsockname()[1]
    sock.close()
    env = {**rbee_env, "RBEE_QUEEN_URL": f"http://127.0.0.1:{port}"}
    try:
        code, chunks, stderr = await run_rbee(["dashboard", "--no-open"], env, timeout=60)
        stdout = b"".join(chunk for _, chunk in chunks).decode()
        assert code == 0, stderr
        login = stdout.strip().splitlines()[-1]
        assert re.fullmatch(rf"http://127\.0\.0\.1:{port}/dashboard/#login=[\w-]+", login), stdout
        assert login.rsplit("=", 1)[1] not in stderr  # the token is on stdout only
        yield Board(f"http://127.0.0.1:{port}", login, env)
    finally:
        code, _, stderr = await run_rbee(["queen", "stop"], env, timeout=60)
        assert code == 0, stderr


@contextlib.contextmanager
def chromium(width: int = 1400, height: int = 900) -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    assert CHROMIUM and CHROMEDRIVER, "install Debian's chromium and chromium-driver"
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     f"--window-size={width},{height}", "--no-first-run", "--disable-extensions"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
        problems = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
        assert not problems, problems  # a CSP violation or a script error shows here
    finally:
        driver.quit()


async def until(driver: WebDriver, condition: Callable[[WebDriver], Any], timeout: float = 15.0) -> Any:
    """WebDriverWait (it polls to a deadline) in a thread, so this test's loop keeps running. The
    live views are swapped under the test's feet: an element gone stale is tried again."""
    wait = WebDriverWait(driver, timeout, poll_frequency=0.05,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException))
    return await asyncio.to_thread(wait.until, condition)


def rows(selector: str) -> Callable[[WebDriver], list[dict[str, str]]]:
    """The elements ``selector`` finds now, read in one step: their text and markup."""
    return lambda driver: driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map(e => ({text: e.textContent, html: e.outerHTML}))",
        selector)


def click(selector: str) -> Callable[[WebDriver], bool]:
    def press(driver: WebDriver) -> bool:
        driver.find_element(By.CSS_SELECTOR, selector).click()
        return True

    return press


async def open_view(driver: WebDriver, board: Board, view: str) -> None:
    """Log in with the board's URL, go to ``view`` and wait for its live stream."""
    driver.get(board.login)
    driver.get(f"{board.page}#{view}")
    await until(driver, rows('#link-state[data-state="live"]'))
