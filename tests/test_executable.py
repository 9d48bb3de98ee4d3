"""ring_attention.executable: PlanKey -> ExecutablePlan, cached once, bounded, and holding
nothing on an accelerator."""

from __future__ import annotations

import dataclasses

import torch

import ring_attention as ra
from ring_attention import executable, plans
from ring_attention.executable import PlanKey, executable_plan
from ring_attention.layout import Layout
from ring_attention.masks import SequenceMask
from ring_attention.options import Options
from tests.fake_cuda import fake_cuda
from tests.inputs import walk

PATTERN = ra.DilatedPattern((8, 16), (1, 2))


def _key(n=16, **changes):
    key = PlanKey(PATTERN, n, 4, 2, SequenceMask(), 1, Layout.CONTIGUOUS, (0,), 1, 8, torch.float32)
    return dataclasses.replace(key, **changes)


def test_a_key_gets_its_plan_once_and_other_options_another():
    plan = executable_plan(_key())
    assert executable_plan(_key()) is plan  # an equal key, another object
    assert plan.key == _key() and set(plan.ranks) == {0}
    other = executable_plan(_key(options=Options(max_call_share=1)))
    assert other is not plan and other.key.options == Options(max_call_share=1)
    assert executable_plan(_key(mask=SequenceMask(causal=True))) is not plan
    executable.clear()  # and the planner's caches behind it
    assert not executable._CACHE and plans._rank_plan.cache_info().currsize == 0
    assert executable_plan(_key()) is not plan


def test_the_cache_holds_the_most_recently_used_plans(monkeypatch):
    monkeypatch.setattr(executable, "MAX_PLANS", 2)
    executable.clear()
    a, b = executable_plan(_key(16)), executable_plan(_key(32))
    assert executable_plan(_key(16)) is a  # a is now the most recent
    executable_plan(_key(48))
    assert len(executable._CACHE) == 2 and _key(32) not in executable._CACHE
    assert executable_plan(_key(16)) is a and executable_plan(_key(32)) is not b
    executable.clear()


def test_a_plan_run_on_cuda_holds_no_tensor_on_an_accelerator():
    # the first pair leaves cells without keys and the second merges into them: on CUDA the
    # executor marks query rows at the end, through the plan's mask of cells without keys
    executable.clear()
    with fake_cuda(backward=False) as fc:
        q, k, v = fc.qkv(batch=1, seq_len=32, heads=2, kv_heads=2, head_dim=64, dtype=torch.float16)
        ra.dilated_attention(q, k, v, ra.DilatedPattern((16, 8), (2, 1)))
    fc.assert_clean()
    (plan,) = executable._CACHE.values()
    (rank,) = plan.ranks.values()
    assert rank._empty_cells, "the run made no mask of cells without keys: nothing was tested"
    found = [obj for obj in walk(plan) if isinstance(obj, torch.Tensor)]
    assert found and all(t.device.type == "cpu" for t in found)
    executable.clear()


def test_the_plan_holds_its_index_tensors():
    """Row sets that are no progression (a dilated segment across zigzag chunks) become CPU
    index tensors once, in the executable plan: a second call reuses them, one cache for all
    of the plan's ranks."""
    executable.clear()
    q, k, v = (torch.randn(1, 60, 2, 8) for _ in range(3))  # zigzag chunks of 15, segments of 20
    zigzag = lambda: ra.ring_dilated_attention(q, k, v, ra.DilatedPattern((20,), (2,)), ring_size=2,  # noqa: E731
                                               layout="zigzag")
    zigzag()
    plan = next(p for p in executable._CACHE.values() if p.key.ring_size == 2)
    ranks = list(plan.ranks.values())
    assert ranks[0].indices and all(r.indices is ranks[0].indices for r in ranks)
    held = {key: id(t) for key, t in ranks[0].indices.items()}
    zigzag()
    assert {key: id(t) for key, t in ranks[0].indices.items()} == held
    executable.clear()


def test_a_narrow_bands_received_kv_is_kept_for_the_backward():
    """Kept where a band reaches at most a shard (what a rank receives is then about one more
    shard): never for full attention, a wider band, or a ring of one."""
    ring = dict(ring_size=4, ranks=(0, 1, 2, 3), pattern=None, seq_len=64)  # shards of 16

    def keeps(**changes):
        return executable_plan(_key(**{**ring, **changes})).keeps_received

    assert keeps(mask=SequenceMask(causal=True, window=(16, 0)))
    assert keeps(mask=SequenceMask(window=(8, 8)))
    assert not keeps(mask=SequenceMask(causal=True, window=(17, 0)))
    assert not keeps(mask=SequenceMask(window=(8, 9)))
    assert not keeps(mask=SequenceMask(causal=True, window=(-1, 0)))
    assert not keeps(mask=SequenceMask(causal=True))
    assert not keeps(mask=SequenceMask(causal=True, window=(4, 0)), ring_size=1, ranks=(0,))
