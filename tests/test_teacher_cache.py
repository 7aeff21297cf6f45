"""The teacher logit cache: what it stores equals the teacher's top K, keys move with what they hash, a killed
build resumes to the same files, and lookups return each row's own targets."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from compactlm.distill.losses import teacher_topk
from compactlm.distill.teacher_cache import TeacherCache, cache_key, teacher_fingerprint
from compactlm.errors import CompactLMError

K, S = 5, 12


def _teacher(seed: int = 0):
    model = tiny_model("llama", layers=1, seed=seed)
    return model, lambda ids: model(ids).logits


def _rows(n: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 64, (n, S), generator=torch.Generator().manual_seed(seed))


def test_cache_holds_the_teachers_top_k_for_every_row(tmp_path):
    model, logits = _teacher()
    rows = _rows()
    cache = TeacherCache(tmp_path, len(rows), S, K, rows_per_shard=4)
    built = cache.build(logits, rows, temperature=2.0, batch_size=3, progress=False)
    assert built["built_shards"] == 3 and built["tokens"] == 10 * S and built["bytes_per_token"] == 6 * K
    order = torch.tensor([9, 0, 4, 4, 7])
    logp, ids = cache.get(order)
    with torch.no_grad():
        want_logp, want_ids = teacher_topk(model(rows[order]).logits, K, 2.0)
    assert logp.shape == ids.shape == (5, S, K) and logp.dtype == torch.float16 and ids.dtype == torch.int32
    assert torch.equal(ids, want_ids) and torch.equal(logp, want_logp)
    with pytest.raises(CompactLMError, match="position 10 out of range"):
        cache.get(torch.tensor([10]))


@pytest.mark.parametrize("targets", ["top_k", "sampled"])
def test_a_killed_build_resumes_to_the_same_files(tmp_path, targets):
    """Sampled targets too: each shard draws from its own seeded stream, so the resumed shards are the same."""
    _, logits = _teacher()
    rows = _rows()
    whole = TeacherCache(tmp_path / "whole", len(rows), S, K, rows_per_shard=4, targets=targets, seed=3)
    whole.build(logits, rows, 1.0, progress=False)
    calls = {"n": 0}

    def dies_on_the_third_batch(ids):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return logits(ids)

    killed = TeacherCache(tmp_path / "killed", len(rows), S, K, rows_per_shard=4, targets=targets, seed=3)
    with pytest.raises(KeyboardInterrupt):
        killed.build(dies_on_the_third_batch, rows, 1.0, batch_size=2, progress=False)
    assert killed.missing() == [1, 2] and sorted(p.name for p in (tmp_path / "killed").iterdir()) == [
        "shard-00000.safetensors"]  # whole shards only, no temporary file
    assert killed.build(logits, rows, 1.0, progress=False)["built_shards"] == 2
    for i in range(whole.shards):
        assert whole.shard_path(i).read_bytes() == killed.shard_path(i).read_bytes()


def test_keys_change_with_teacher_rows_seed_k_and_temperature():
    model, logits = _teacher()
    rows = _rows()
    config = model.config.to_dict()
    fp = teacher_fingerprint(config, logits, rows[:2])
    assert fp == teacher_fingerprint(config, logits, rows[:2])
    assert fp != teacher_fingerprint(config, _teacher(seed=1)[1], rows[:2])  # same config, other weights
    key = cache_key(fp, rows, 0, K, 1.0)
    assert key == cache_key(fp, rows.clone(), 0, K, 1.0)
    assert len({key, cache_key(fp, _rows(seed=1), 0, K, 1.0), cache_key(fp, rows, 0, K + 1, 1.0),
                cache_key(fp, rows, 0, K, 2.0), cache_key(fp + "x", rows, 0, K, 1.0), cache_key(fp, rows, 1, K, 1.0),
                cache_key(fp, rows, 0, K, 1.0, "sampled")}) == 7


def test_build_rejects_rows_of_another_shape_and_get_needs_the_shards(tmp_path):
    _, logits = _teacher()
    cache = TeacherCache(tmp_path, 10, S, K)
    with pytest.raises(CompactLMError, match="are not the cache's"):
        cache.build(logits, _rows(n=9), 1.0, progress=False)
    with pytest.raises(CompactLMError, match="is missing"):
        cache.get(torch.tensor([0]))


def test_a_build_reads_its_rows_a_shard_at_a_time_in_their_order_of_use(tmp_path):
    """Regression: every train row of the run was gathered as int64 before the build (8 GB per billion tokens).
    Now the build reads row order[i] for position i, one shard's rows at a time, and stores what a build from
    the reordered rows stores."""
    _, logits = _teacher()
    rows, order = _rows(), torch.tensor([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    reads = []

    class Counted:
        shape = rows.shape

        def __len__(self):
            return len(rows)

        def __getitem__(self, index):
            reads.append(len(index))
            return rows[index]

    lazy = TeacherCache(tmp_path / "lazy", len(order), S, K, rows_per_shard=4)
    lazy.build(logits, Counted(), 1.0, progress=False, order=order)
    assert reads == [4, 4, 2]
    eager = TeacherCache(tmp_path / "eager", len(order), S, K, rows_per_shard=4)
    eager.build(logits, rows[order], 1.0, progress=False)
    for i in range(3):
        assert lazy.shard_path(i).read_bytes() == eager.shard_path(i).read_bytes()
