"""The logprobs' top-k pick on a logits row: the same ids as a full partition."""

from __future__ import annotations

import numpy as np
import pytest

from rbee.worker.backends.llama_batch import top_ids


@pytest.mark.parametrize("spread", [0.5, 5.0, 40.0])
@pytest.mark.parametrize("k", [0, 1, 5, 20])
def test_top_ids_match_a_full_partition(spread: float, k: int) -> None:
    rng = np.random.default_rng(int(spread * 10) + k)
    for _ in range(20):
        row = (rng.standard_normal(50_000) * spread).astype(np.float32)
        found = sorted(int(t) for t in top_ids(row, float(row.max()), k))
        expected = sorted(int(t) for t in np.argsort(-row, kind="stable")[:k])
        assert found == expected


def test_few_near_the_top_falls_back_to_the_whole_row() -> None:
    row = np.zeros(1000, dtype=np.float32)
    row[7] = 100.0  # one far ahead: fewer than k within the margin
    found = [int(t) for t in top_ids(row, 100.0, 3)]
    assert 7 in found and len(set(found)) == 3
