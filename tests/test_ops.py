"""torch.compile over the public functions and modules: one graph, no recompile, eager's results.

``fullgraph=True`` turns any graph break into an error; a ``CompileCounter`` backend
counts the frames dynamo compiles, so a second call of the same shape that recompiled
would count two. Results are compared with the eager call (the same code inside the
custom ops, so exactly equal) and with the dense reference.
"""

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import ring_attention as ra
from ring_attention import ops, registry

from .inputs import qkv

N, H, D = 64, 4, 16
PATTERN = ra.DilatedPattern((16, 32), (1, 2))


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled(fn, backend="aot_eager"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(fn, fullgraph=True, backend=counter), counter


def _grads(out, inputs, g):
    return torch.autograd.grad(out, inputs, g)


def _check_compiled_equals_eager(fn, inputs, g, reference=None, backend="aot_eager"):
    compiled, counter = _compiled(fn, backend)
    out = compiled(*inputs)
    want = fn(*inputs)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    for got, expected in zip(_grads(out, inputs, g), _grads(want, inputs, g)):
        torch.testing.assert_close(got, expected, atol=0, rtol=0)
    if reference is not None:
        torch.testing.assert_close(out, reference(*inputs), atol=1e-10, rtol=0)
    compiled(*inputs)  # the same shape again: no second frame
    assert counter.frame_count == 1
    return counter


@pytest.mark.parametrize("name", list(registry.VARIANTS))
def test_every_variant_compiles_to_one_graph(name):
    variant = registry.VARIANTS[name]
    q, k, v, g = qkv(1, N, H, 2, D, seed=1, requires_grad=True, grad_out=True)
    counter = _check_compiled_equals_eager(variant, (q, k, v), g, reference=variant.reference)
    if name != "dense":  # one opaque op and the getitem of its output: none of the executor's ops
        # (documents given as ints become one more node: the boundaries' constant tensor)
        assert counter.op_count == 2 + (variant.documents(N) is not None)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_compiled_half_and_single_precision_equal_eager(dtype):
    q, k, v, g = qkv(2, N, H, H, D, seed=2, dtype=dtype, requires_grad=True, grad_out=True)
    fn = registry.get("longnet-ring4-zigzag-causal")
    _check_compiled_equals_eager(fn, (q, k, v), g)


def test_inductor_compiles_ring_dilated_forward_and_backward():
    q, k, v, g = qkv(1, N, H, 2, D, seed=3, dtype=torch.float32, requires_grad=True, grad_out=True)

    def fn(q, k, v):
        return ra.ring_dilated_attention(q * 2, k, v, PATTERN, ring_size=2, causal=True).relu()

    _check_compiled_equals_eager(fn, (q, k, v), g, backend="inductor")


def test_scale_and_grouped_query_heads_reach_the_op():
    q, k, v, g = qkv(1, N, H, 1, D, seed=4, requires_grad=True, grad_out=True)

    def fn(q, k, v):
        return ra.dilated_attention(q, k, v, PATTERN, causal=True, scale=0.3)

    def reference(q, k, v):
        return ra.reference_attention(q, k, v, pattern=PATTERN, causal=True, scale=0.3)

    _check_compiled_equals_eager(fn, (q, k, v), g, reference=reference)


def test_a_new_shape_compiles_once_more_and_is_right():
    compiled, counter = _compiled(lambda q, k, v: ra.ring_attention(q, k, v, ring_size=2, causal=True))
    for n in (N, 2 * N, 2 * N):
        q, k, v = qkv(1, n, H, H, D, seed=n)
        torch.testing.assert_close(compiled(q, k, v), ra.reference_attention(q, k, v, causal=True),
                                   atol=1e-10, rtol=0)
    assert counter.frame_count <= 2  # the second length once (dynamic or not), then cached


def test_checkpointed_backward_reruns_the_forward_op(monkeypatch):
    q, k, v, g = qkv(1, N, H, H, D, seed=5, requires_grad=True, grad_out=True)
    calls = []

    def counted(fn):
        def run(*args):
            calls.append(fn.__name__)
            return fn(*args)
        return run

    monkeypatch.setattr(ops, "run_forward", counted(ops.run_forward))
    monkeypatch.setattr(ops, "run_backward", counted(ops.run_backward))
    compiled, _ = _compiled(lambda q, k, v: ra.dilated_attention(q, k, v, PATTERN, checkpoint=True))
    out = compiled(q, k, v)
    assert calls == ["run_forward"]
    grads = _grads(out, (q, k, v), g)
    assert calls == ["run_forward", "run_forward", "run_backward"]  # recomputed, not stored
    want = _grads(ra.reference_attention(q, k, v, pattern=PATTERN), (q, k, v), g)
    for got, expected in zip(grads, want):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("ring_size", [None, 2])
def test_modules_compile_to_one_graph(ring_size):
    torch.manual_seed(0)
    mha = ra.MultiheadDilatedAttention(
        H * D, H, PATTERN, batch_first=True, num_kv_heads=2, ring_size=ring_size, causal=True,
        dtype=torch.float64,
    )
    x = torch.randn(2, N, H * D, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, N, H * D, dtype=torch.float64)
    compiled, counter = _compiled(mha)
    out, _ = compiled(x)
    want, _ = mha(x)
    torch.testing.assert_close(out, want, atol=0, rtol=0)
    params = (x, *mha.parameters())
    for got, expected in zip(_grads(out, params, g), _grads(want, params, g)):
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
    compiled(x)
    assert counter.frame_count == 1

    attn = ra.DilatedAttention(PATTERN, causal=True)
    q, k, v, g = qkv(1, N, H, H, D, seed=6, requires_grad=True, grad_out=True)
    _check_compiled_equals_eager(attn, (q, k, v), g,
                                 reference=lambda q, k, v: ra.reference_attention(q, k, v, pattern=PATTERN, causal=True))


def test_bad_input_under_compile_raises_the_eager_error():
    compiled, _ = _compiled(lambda q, k, v: ra.ring_attention(q, k, v, ring_size=3))
    q, k, v = qkv(1, N, H, H, D)
    with pytest.raises(Exception, match="R=3"):
        compiled(q, k, v)
