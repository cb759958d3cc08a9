"""The one error tree: every class has its own code, every code its HTTP status and OpenAI
type, and no module defines an rbee error outside rbee/errors.py."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import rbee
from rbee import errors
from rbee.errors import CLASSES, HTTP, RbeeError, http_status

EXPECTED = {  # the table of the module docstring, spelled out: a changed status must change this test
    "internal": 500, "bad_config": 400, "bad_inventory": 400, "trust_refused": 400, "bad_request": 400,
    "bad_model_ref": 400, "bad_model": 400, "no_engine": 400, "not_found": 404, "model_not_found": 404,
    "unknown_node": 404, "unknown_worker": 404, "job_not_found": 404, "model_error": 500,
    "model_load_failed": 500, "download_failed": 502,
    "download_interrupted": 502, "disk_full": 507, "no_capacity": 503, "no_hive": 503,
    "queue_full": 429, "cancelled": 499, "link_failed": 502, "stalled": 504, "peer_down": 503,
    "hub_unreachable": 502, "unproven_peer": 502, "ssh_failed": 502, "host_key_refused": 502,
    "remote_command_failed": 502,
    "peer_error": 502, "worker_died": 503, "worker_stalled": 503, "unauthorized": 401,
    "forbidden": 403, "startup_failed": 503,
    "node_down": 503, "wheelhouse_failed": 500, "engine_build_failed": 500,
    "no_private_network": 503,
}


def test_every_class_has_its_own_code() -> None:
    codes = [cls.code for cls in CLASSES]
    assert len(codes) == len(set(codes)), sorted(c for c in codes if codes.count(c) > 1)


@pytest.mark.parametrize("code", sorted(EXPECTED))
def test_every_code_maps_to_its_status(code: str) -> None:
    status, kind = http_status(code)
    assert status == EXPECTED[code]
    if status == 429:
        assert kind == "rate_limit_error"
    elif status == 401:
        assert kind == "authentication_error"
    elif status == 403:
        assert kind == "permission_error"  # openai's PermissionDeniedError
    elif 400 <= status < 500:
        assert kind == "invalid_request_error"
    else:
        assert kind == "server_error"


def test_the_table_covers_the_tree_and_the_docstring_names_every_class() -> None:
    assert set(HTTP) == set(EXPECTED)
    for cls in CLASSES:
        assert cls.__name__ in (errors.__doc__ or ""), cls.__name__
        assert f" {cls.code} " in (errors.__doc__ or "") or cls is errors.PeerError, cls.code


def test_an_unknown_code_from_a_peer_is_a_server_error() -> None:
    assert http_status("something_new") == (500, "server_error")


def test_no_rbee_error_is_defined_outside_errors_py() -> None:
    for module in pkgutil.walk_packages(rbee.__path__, "rbee."):
        if module.name.endswith("__main__"):
            continue
        importlib.import_module(module.name)
    strays = [cls for cls in _all_subclasses(RbeeError) if cls.__module__ != "rbee.errors"]
    assert not strays, strays


def _all_subclasses(cls: type) -> list[type]:
    return [sub for child in cls.__subclasses__() for sub in (child, *_all_subclasses(child))]
