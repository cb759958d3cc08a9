from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from rbee.config import QueenConfig, ServeOptions
from rbee.keeper.session import start_queen

pytestmark = pytest.mark.e2e


@pytest.fixture
async def queen_url(rbee_env: dict[str, str]) -> AsyncIterator[str]:
    """A real queen process (it starts the real hive and workers on demand)."""
    config = QueenConfig(home=Path(rbee_env["RBEE_HOME"]), heartbeat_interval=0.5, ephemeral=True, serve=ServeOptions())
    child = await start_queen(config, ephemeral=True)
    try:
        yield child.url
    finally:
        await child.stop(grace=20.0)
