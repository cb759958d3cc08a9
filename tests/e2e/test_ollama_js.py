"""The official `ollama` JavaScript client (npm `ollama`, run with node) against a real queen:
list, and a chat that streams (issue 26). scripts/test installs node and tests/js's packages."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import owner_token

JS = Path(__file__).parent.parent / "js"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed (scripts/test installs it)")
async def test_ollama_js_lists_and_streams_a_chat(queen_url: str) -> None:
    assert (JS / "node_modules" / "ollama").is_dir(), "run `npm ci --prefix tests/js` (scripts/test does)"
    child = await asyncio.create_subprocess_exec(
        "node", str(JS / "ollama_chat.mjs"), cwd=JS, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "OLLAMA_HOST": queen_url, "OLLAMA_KEY": owner_token()})
    out, err = await asyncio.wait_for(child.communicate(), 100)
    assert child.returncode == 0, err.decode()
    result = json.loads(out)
    assert "gemma3-270m" in result["models"]
    pieces = result["pieces"]
    assert "".join(p["text"] for p in pieces).strip() and len(pieces) >= 5
    assert len({p["at"] for p in pieces}) > 1  # chunks arrive as they are generated, not in one burst
    assert result["final"]["done"] and result["final"]["eval_count"] == len(pieces)
