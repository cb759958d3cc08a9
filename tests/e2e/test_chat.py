"""`rbee infer` through a model's own chat template by default, and `rbee chat`: turns keep
their history, /reset forgets it, Ctrl+C stops an answer but not the session. A tiny GGUF with
`tokenizer.chat_template` set stands for an instruct model; the default model is a base model."""

from __future__ import annotations

import asyncio
import re
import signal
from pathlib import Path

import pytest

from tests.helpers import RBEE, eventually, run_rbee
from tests.tiny_gguf import CHAT_TEMPLATE, write_tiny_model

PROMPT_TOKENS = re.compile(r"prompt (\d+) tokens")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("chat") / "tiny-chat.gguf", CHAT_TEMPLATE)


async def test_infer_uses_the_models_chat_template_unless_told_not_to(rbee_env: dict[str, str],
                                                                      chat_model: Path) -> None:
    args = ["infer", "-m", f"file:{chat_model}", "--max-tokens", "4", "--seed", "1", "hello there"]
    code, _, templated = await run_rbee(args, rbee_env)
    assert code == 0, templated
    assert "chat formatted with the model's own chat template" in templated
    code, _, plain = await run_rbee([*args, "--no-template"], rbee_env)
    assert code == 0, plain
    assert "chat formatted" not in plain
    # the template's role markers and end-of-turn text make the prompt longer than the bare text
    assert int(PROMPT_TOKENS.findall(templated)[0]) > int(PROMPT_TOKENS.findall(plain)[0]) + 10


async def test_infer_sends_a_base_model_the_prompt_as_it_is(rbee_env: dict[str, str]) -> None:
    code, chunks, stderr = await run_rbee(["infer", "--max-tokens", "8", "--seed", "1", "The sky is blue because"],
                                          rbee_env)
    assert code == 0, stderr
    assert "sent as it is: the model has no chat template" in stderr
    assert b"".join(chunk for _, chunk in chunks).strip()


async def test_chat_keeps_the_history_and_reset_forgets_it(rbee_env: dict[str, str], chat_model: Path) -> None:
    process = await asyncio.create_subprocess_exec(
        *RBEE, "chat", "-v", "-m", f"file:{chat_model}", "--max-tokens", "4", "--seed", "1", "--system", "Be brief.",
        env=rbee_env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    stdout, stderr_bytes = await asyncio.wait_for(
        process.communicate(b"Hello!\nAnd again?\n/nonsense\n/reset\nHello!\n/exit\n"), 90)
    stderr = stderr_bytes.decode()
    assert process.returncode == 0, stderr
    first, second, after_reset = map(int, PROMPT_TOKENS.findall(stderr))
    assert second > first + 10  # the first exchange went along with the second question
    assert after_reset == first  # /reset: the same question costs what it cost at the start
    assert "unknown command '/nonsense'" in stderr and "the conversation is forgotten" in stderr
    assert stderr.count("chat formatted with the model's own chat template") == 3
    assert stdout.strip()


async def test_ctrl_c_stops_an_answer_and_the_chat_goes_on(rbee_env: dict[str, str]) -> None:
    process = await asyncio.create_subprocess_exec(
        *RBEE, "chat", "--max-tokens", "4000", "--temperature", "0.8", "--seed", "3", env=rbee_env,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert process.stdin is not None and process.stdout is not None and process.stderr is not None
    out, err = bytearray(), bytearray()

    async def pump(stream: asyncio.StreamReader, into: bytearray) -> None:
        while chunk := await stream.read(4096):
            into += chunk

    pumps = [asyncio.ensure_future(pump(process.stdout, out)), asyncio.ensure_future(pump(process.stderr, err))]

    async def say(line: bytes) -> None:
        assert process.stdin is not None
        process.stdin.write(line + b"\n")
        await process.stdin.drain()

    try:
        for question, stops in ((b"Tell me a very long story about the sea.", 1), (b"And another one, please.", 2)):
            before = len(out.strip())
            await say(question)
            await eventually(lambda: len(out.strip()) > before + 8, timeout=60)  # noqa: B023 (awaited here)
            process.send_signal(signal.SIGINT)
            await eventually(lambda: err.count(b"the answer was cancelled") == stops, timeout=30)  # noqa: B023
        await say(b"/exit")
        assert await asyncio.wait_for(process.wait(), 30) == 0, err.decode()
        assert b"interrupted" not in err  # the session itself was not cut short
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await asyncio.gather(*pumps)
