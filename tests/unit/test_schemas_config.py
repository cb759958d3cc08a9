from __future__ import annotations

from pathlib import Path

import pytest

from rbee.config import HiveConfig, QueenConfig, ServeOptions, WorkerConfig, from_args, heartbeat_interval, to_args
from rbee.errors import ConfigError, RequestError
from rbee.link.schemas import JobRequest, PullRequest, ShareRequest, parse_job_request, parse_wire


def test_defaults_and_downstream_body() -> None:
    request = parse_job_request({"prompt": "hi", "node": "localhost", "stop": "\n"})
    assert request.max_tokens == 256 and request.stop == ["\n"]
    assert request.downstream(node=None) == {
        "prompt": "hi", "max_tokens": 256, "temperature": 0.8, "top_p": 0.95, "stop": ["\n"], "top_k": 40,
        "min_p": 0.05, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
    }


@pytest.mark.parametrize(
    "body, field",
    [
        ({}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 10**9}, "max_tokens"),
        ({"prompt": "x", "temperature": -1}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "seed": "abc"}, "seed"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "job_id": "mine"}, "job_id"),
    ],
)
def test_invalid_requests_name_the_field(body: dict, field: str) -> None:
    with pytest.raises(RequestError, match=field):
        parse_job_request(body)


def test_role_configs_round_trip_through_flags(tmp_path: Path) -> None:
    worker = WorkerConfig("w-1", tmp_path / "m.gguf", "http://127.0.0.1:1", n_ctx=512, serve=ServeOptions())
    assert from_args(WorkerConfig, to_args(worker)) == worker
    hive = HiveConfig(name="a", queen_url="http://q", home=tmp_path, models_dir=tmp_path / "m")
    assert from_args(HiveConfig, to_args(hive)) == hive
    queen = QueenConfig(home=tmp_path, ephemeral=True)
    parsed = from_args(QueenConfig, [*to_args(queen), "--fd", "5", "--parent-pid", "9"])
    assert parsed.ephemeral and parsed.serve.fd == 5 and parsed.serve.parent_pid == 9


def test_heartbeat_interval_from_env() -> None:
    assert heartbeat_interval({}) == 2.0
    assert heartbeat_interval({"RBEE_HEARTBEAT_INTERVAL": "0.5"}) == 0.5
    with pytest.raises(ConfigError, match="RBEE_HEARTBEAT_INTERVAL"):
        heartbeat_interval({"RBEE_HEARTBEAT_INTERVAL": "soon"})


@pytest.mark.parametrize("given, expected", [
    (0, 0.0), ("0", 0.0), (300, 300.0), ("300", 300.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0),
    (-1, -1.0), (-20, -1.0), ("-1", -1.0), ("-5m", -1.0),
])
def test_keep_alive_takes_ollama_durations(given: object, expected: float) -> None:
    assert JobRequest(prompt="x", keep_alive=given).keep_alive == expected


@pytest.mark.parametrize("given", ["soon", "5 minutes", "", "1d"])
def test_a_keep_alive_that_is_no_duration_is_refused_naming_the_forms(given: str) -> None:
    with pytest.raises(RequestError) as caught:
        parse_job_request({"prompt": "x", "keep_alive": given})
    assert "keep_alive" in caught.value.message and "5m" in caught.value.message


def test_a_share_request_names_its_layers_or_is_refused() -> None:
    asked = parse_wire(ShareRequest, {"model": "gemma3-270m", "bytes": 5, "ref": "gemma3-270m", "layers": [9, 9],
                                      "output": True}, "share request")
    assert asked.layers == (9, 9) and asked.output
    assert parse_wire(ShareRequest, {"model": "m", "bytes": 5}, "share request").layers is None  # an older queen
    for bad in ({"model": "m", "bytes": 0}, {"model": "", "bytes": 5}, {"model": "m", "bytes": 5, "layers": [-1, 2]},
                {"model": "m", "bytes": 5, "layers": [1]}, {"model": "m", "bytes": 5, "output": "yes please"}):
        with pytest.raises(RequestError, match="malformed share request"):
            parse_wire(ShareRequest, bad, "share request")


def test_a_pull_may_carry_the_part_of_a_share_to_cache() -> None:
    pulled = parse_wire(PullRequest, {"ref": "gemma3-270m", "share": {"layers": [16, 2], "output": True}}, "pull")
    assert pulled.share is not None and pulled.share.layers == (16, 2) and pulled.share.output
    assert parse_wire(PullRequest, {"ref": "gemma3-270m"}, "pull").share is None  # `rbee models pull`
    for bad in ({"ref": ""}, {"ref": "m", "share": {"layers": [-1, 2]}}, {"ref": "m", "share": {"output": True}}):
        with pytest.raises(RequestError, match="malformed pull"):
            parse_wire(PullRequest, bad, "pull")
