"""ring_attention.views: strided views of a shard (packed rows, runs, view recipes,
scatter-adds), checked against plain torch indexing and explicit loops."""

from __future__ import annotations

import pytest
import torch

import ring_attention as ra
from ring_attention import views
from tests.inputs import qkv


def test_inputs_at_any_storage_offset_reuse_the_view_recipes():
    # a query that is a slice of a longer buffer at a new offset every call: the same
    # recipes serve (they are relative to the tensor's offset), and give the right rows
    from ring_attention import executable

    pattern = ra.DilatedPattern((8, 16), (1, 2))
    buffer, k, v = qkv(1, 40, 4, 4, 8, dtype=torch.float32)[0], *qkv(1, 32, 4, 4, 8, seed=1, dtype=torch.float32)[1:]
    counts = []
    for start in range(4):
        q = buffer[:, start : start + 32]
        torch.testing.assert_close(ra.dilated_attention(q, k, v, pattern), ra.reference_attention(q, k, v, pattern=pattern))
        counts.append(sum(len(rank.recipes) for plan in executable._CACHE.values() for rank in plan.ranks.values()))
    assert counts[1:] == counts[:1] * 3


def _x(shape=(2, 12, 6, 3), seed=0):
    return qkv(*shape[:3], shape[2], shape[3], seed=seed)[0]


@pytest.mark.parametrize("rows, heads, offsets", [
    (slice(1, 10, 3), slice(0, 6, 2), 2),  # a block of 2 head offsets: rows and heads shifted by o
    (slice(0, 10, 1), slice(1, 4, 1), 3),
    (slice(2, 8, 2), slice(5, 6, 1), 1),
    (torch.tensor([0, 3, 4, 9]), slice(1, 5, 2), 1),  # rows that are no progression: a gather
    (slice(0, 12, 4), torch.tensor([0, 0, 2]), 1),  # grouped-query kv heads repeat
])
def test_packed_is_plain_indexing_for_every_offset(rows, heads, offsets):
    x = _x()
    got = views.packed(x, rows, heads, offsets)
    r = torch.arange(12)[rows] if isinstance(rows, slice) else rows
    h = torch.arange(6)[heads] if isinstance(heads, slice) else heads
    assert got.shape == (2, offsets, len(r), len(h), 3)
    for o in range(offsets):
        torch.testing.assert_close(got[:, o], x[:, r + o][:, :, h + o], rtol=0, atol=0)
    strided = isinstance(rows, slice) and isinstance(heads, slice)
    assert (got.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()) == strided
    torch.testing.assert_close(views.take(x, rows, heads), x[:, r][:, :, h], rtol=0, atol=0)


def test_runs_reshape_like_an_explicit_loop():
    x = qkv(2, 20, 3, 3, 4)[0].unflatten(2, (1, 3)).transpose(1, 2)  # [B, O=1, M=20, h=3, D]
    start, count, length = 2, 3, 5
    got = views.run_view(x, start, count, length)  # [B, O, runs, h, L, D]
    for i in range(count):
        for j in range(length):
            torch.testing.assert_close(got[:, :, i, :, j], x[:, :, start + i * length + j], rtol=0, atol=0)
    flat = views.runs(x, start, count, length)
    assert flat.shape == (2 * count, 3, length, 4)
    torch.testing.assert_close(flat[count + 1], x[1, 0, start + length : start + 2 * length].transpose(0, 1))
    out = views.unpacked(got, torch.float32)  # [B, runs*L, h, D]: the packed rows back, a copy
    torch.testing.assert_close(out, x[:, 0, start : start + count * length].float(), rtol=0, atol=0)


@pytest.mark.parametrize("rows", [slice(1, 9, 2), torch.tensor([0, 5, 6, 11])])
@pytest.mark.parametrize("heads", [slice(0, 3, 1), torch.tensor([1, 1, 0])])
def test_scatter_add_sums_like_a_loop_of_index_add(rows, heads):
    acc = _x(seed=1)
    grad = qkv(2, 4, 3, 3, 3, seed=2)[0]  # [B, M, h, D]
    r = torch.arange(12)[rows] if isinstance(rows, slice) else rows
    h = torch.arange(6)[heads] if isinstance(heads, slice) else heads
    expected = acc.clone()
    for i, row in enumerate(r.tolist()):
        for j, head in enumerate(h.tolist()):  # a repeated head adds up
            expected[:, row, head] += grad[:, i, j]
    views.scatter_add(acc, rows, heads, grad)
    torch.testing.assert_close(acc, expected, rtol=0, atol=1e-15)


def test_a_view_recipe_gives_what_build_gives_and_is_found_once_per_layout():
    recipes = {}
    build = lambda x: views.run_view(x[:, 1:], 2, 2, 3)  # noqa: E731
    base = _x((2, 16, 4, 3))
    heads_major = base.transpose(1, 2).contiguous().transpose(1, 2)
    at_an_offset = _x((3, 16, 4, 3))[1:]  # base's strides at another storage offset
    layouts = [t.unflatten(1, (2, 8)) for t in (at_an_offset, heads_major, base)]  # [B, O, M, h, D]
    for i, x in enumerate(layouts):
        for _ in range(2):
            got = views.view(recipes, "q", x, build)
            torch.testing.assert_close(got, build(x), rtol=0, atol=0)
            assert got.data_ptr() == build(x).data_ptr()  # a view of x, not a copy
        assert len(recipes) == min(i + 1, 2)  # base has the strides of the first
    copying = lambda x: views.runs(x, 0, 2, 3)  # noqa: E731 (2 runs of 3 of 8 rows: the flatten copies)
    x = layouts[0]
    torch.testing.assert_close(views.view(recipes, "copy", x, copying), copying(x))
    assert recipes[("copy", x.shape, x.stride())] is False


@pytest.mark.parametrize("batch", [1, 2])
def test_adopted_rows_are_the_runs_back_to_back_where_the_layout_allows(batch):
    runs, h, length, d = 3, 2, 4, 5
    rows_major = torch.randn(batch, runs, length, h, d, dtype=torch.float64)  # as the kernels lay out
    kernel_out = rows_major.flatten(0, 1).transpose(1, 2)  # [B*runs, h, L, D]
    got = views.adopted_rows(kernel_out, batch)
    torch.testing.assert_close(got, rows_major.flatten(1, 2), rtol=0, atol=0)
    assert got.data_ptr() == kernel_out.data_ptr()
    assert views.adopted_rows(kernel_out.contiguous(), batch) is None  # heads-major runs
    one_run = kernel_out.contiguous()[:batch]
    torch.testing.assert_close(views.adopted_rows(one_run, batch), one_run.transpose(1, 2), rtol=0, atol=0)
