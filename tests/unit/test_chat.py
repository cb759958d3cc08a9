"""The pieces of chat that need no server: `rbee chat`'s history and commands, and the worker's
choice between a model's own chat template and the prompt as it is."""

from __future__ import annotations

from rbee.keeper.chat import Conversation, command
from rbee.link.schemas import JobRequest
from rbee.worker.app import as_chat
from rbee.worker.chat import render


def test_a_turn_joins_the_history_only_once_answered() -> None:
    talk = Conversation(system="Be brief.")
    asked = talk.asking("Hi")
    assert asked == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert talk.turns == []  # a cancelled or failed answer leaves no trace
    talk.answered("Hi", "Hello!")
    assert talk.asking("More?")[1:] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                                        {"role": "user", "content": "More?"}]
    talk.reset()
    assert talk.asking("Hi") == asked  # the system message stays


def test_slash_commands() -> None:
    assert command("hello /reset") is None
    assert command("/reset") == command("/clear") == "reset"
    assert command("/exit") == command("/bye") == command("/QUIT now") == "exit"
    assert command("/help") == "help"
    assert command("/what") == command("/") == "unknown"


def test_auto_template_turns_a_prompt_into_a_user_turn_only_for_a_model_with_one() -> None:
    notes: list[str] = []
    request = JobRequest(prompt="Why?", template="auto")
    chat = as_chat(request, {"tokenizer.chat_template": "{{ messages[0].content }}"}, lambda a, m: notes.append(m))
    assert chat.prompt is None and chat.messages is not None and chat.messages[0].content == "Why?"
    base = as_chat(request, {"general.architecture": "gemma3"}, lambda a, m: notes.append(m))
    assert base.prompt == "Why?" and base.messages is None
    assert notes == ["the prompt is sent as it is: the model has no chat template (a base model)"]
    plain = JobRequest(prompt="Why?")  # the OpenAI /v1/completions path: never templated
    assert as_chat(plain, {"tokenizer.chat_template": "x"}, lambda a, m: None) is plain


def test_the_models_own_template_renders_the_turns() -> None:
    from tests.tiny_gguf import CHAT_TEMPLATE

    turns = JobRequest(messages=[{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]).messages
    assert turns is not None
    chat = render(turns, {"tokenizer.chat_template": CHAT_TEMPLATE, "rbee.eos_text": "</s>"})
    assert chat.prompt == "<|system|>\nS</s>\n<|user|>\nU</s>\n<|assistant|>\n" and chat.stop == ("</s>",)
