from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.helpers import queen

HERE = Path(__file__).parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test of this folder ``e2e`` (a ``pytestmark`` here would do nothing: pytest
    reads it in test modules only), so ``-m "not e2e"`` runs the quick suite."""
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
async def queen_url(rbee_env: dict[str, str]) -> AsyncIterator[str]:
    """A real queen process (it starts the real hive and workers on demand)."""
    async with queen(rbee_env) as url:
        yield url
