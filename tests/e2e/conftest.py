from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.helpers import queen

pytestmark = pytest.mark.e2e


@pytest.fixture
async def queen_url(rbee_env: dict[str, str]) -> AsyncIterator[str]:
    """A real queen process (it starts the real hive and workers on demand)."""
    async with queen(rbee_env) as url:
        yield url
