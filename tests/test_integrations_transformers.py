"""ring_attention.integrations.transformers: parity with transformers' own ``sdpa`` backend on
tiny random models, one process and gloo ranks in both layouts, and every refusal.

Runs in ``nox -s transformers`` (two pinned transformers releases); skipped where the extra is
absent, as in ``nox -s tests``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="the transformers extra is absent (nox -s transformers runs these)")

from transformers import AttentionInterface, AutoModelForCausalLM  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface  # noqa: E402

import ring_attention as ra  # noqa: E402
import ring_attention.integrations.transformers as rat  # noqa: E402
from ring_attention.integrations.transformers.parity import FAMILIES, tiny_config  # noqa: E402
from tests.distributed_worker import wait_or_kill  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("transformers_worker.py")
JOIN_TIMEOUT_S = int(os.environ.get("RING_TEST_TIMEOUT_S", "150"))
TOL = {torch.float64: 1e-9, torch.float32: 2e-5}
DOCUMENTS = (0, 5, 30, 31, 64)  # a 1-token document; one spanning shards of every ring here
MIXTURE = ra.DilatedPattern(segment_lengths=(16, 32), dilation_rates=(1, 2))
HEAD_GROUPS = ra.DilatedPattern(segment_lengths=(16, 32), dilation_rates=(1, 2), mode="head_groups")


def _assert_parity(parity: rat.Parity, dtype: torch.dtype = torch.float64) -> None:
    worst = max(parity.gradients, key=parity.gradients.get)
    assert parity.logits <= TOL[dtype], parity
    assert parity.gradient <= TOL[dtype], f"{parity}: worst gradient {worst}"


# --- one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("documents", [None, DOCUMENTS], ids=["one-document", "packed"])
@pytest.mark.parametrize("ring", [{}, {"ring_size": 2, "layout": "zigzag"}, {"ring_size": 4, "layout": "documents"}],
                         ids=["one-device", "ring2-zigzag", "ring4-documents"])
def test_full_attention_matches_sdpa(family, documents, ring):
    _assert_parity(rat.check_parity(family, cu_seqlens=documents, **ring))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("pattern", [MIXTURE, HEAD_GROUPS], ids=["mixture", "head_groups"])
@pytest.mark.parametrize("documents", [None, (0, 32, 64), (0, 16, 32, 64)],
                         ids=["one-document", "packed", "packed-within-segments"])
def test_dilated_attention_matches_sdpa_with_log_weights(family, pattern, documents):
    _assert_parity(rat.check_parity(family, pattern=pattern, cu_seqlens=documents, ring_size=2))


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_float32_matches_sdpa_to_float32_tolerance(family):
    _assert_parity(rat.check_parity(family, cu_seqlens=DOCUMENTS, ring_size=2, dtype=torch.float32), torch.float32)


def test_the_tiny_models_window_moves_their_logits():
    """The parity of windowed models is not blind to the window: without it the logits move."""
    model = _model("mistral", sliding_window=8)
    ids = torch.arange(64)[None] % 100
    windowed = model(input_ids=ids, use_cache=False).logits
    model.config.sliding_window = None
    assert (model(input_ids=ids, use_cache=False).logits - windowed).abs().max() > 1e-3


def test_backends_are_registered_through_the_public_interfaces():
    backend = rat.register("ring_attention_test", pattern=MIXTURE, ring_size=2)
    assert AttentionInterface()["ring_attention_test"] is backend
    assert AttentionMaskInterface()["ring_attention_test"] == backend.mask
    assert rat.ATTENTION in AttentionInterface() and rat.ATTENTION in AttentionMaskInterface()


def test_the_cli_reports_parity_and_fails_above_its_tolerance():
    cmd = [sys.executable, "-m", "ring_attention.integrations.transformers", "--check", "qwen2",
           "--documents", ",".join(map(str, DOCUMENTS)), "--ring-size", "2", "--layout", "zigzag"]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("qwen2") and "logits" in done.stdout
    failed = subprocess.run(cmd[:-4] + ["--dtype", "float32", "--tol", "0"], cwd=ROOT, capture_output=True,
                            text=True, timeout=JOIN_TIMEOUT_S)
    assert failed.returncode == 1 and "FAIL" in failed.stderr


def test_the_trainers_keywords_pass_through():
    """What transformers hands every layer besides the attention's own arguments (the Trainer's
    ``num_items_in_batch``, the output flags) changes nothing here."""
    ids = torch.arange(16)[None] % 100
    out = _model()(input_ids=ids, labels=ids, num_items_in_batch=torch.tensor(15), output_hidden_states=True,
                   use_cache=False)
    assert out.loss.isfinite() and len(out.hidden_states) == 3


def test_a_window_a_layer_holds_without_passing_it_is_honoured():
    """Some models' layers keep their window on the module and do not pass it to the call."""
    module = _Module()
    module.sliding_window = 4
    q, k, v = _qkv(16, 16)
    got = AttentionInterface()[rat.ATTENTION](module, q, k, v, None)[0]
    want = AttentionInterface()[rat.ATTENTION](_Module(), q, k, v, None, sliding_window=4)[0]
    assert torch.equal(got, want)
    assert not torch.equal(got, AttentionInterface()[rat.ATTENTION](_Module(), q, k, v, None)[0])


# --- refusals: a clear error at the first forward, never a silent drop ----------------------


@pytest.mark.parametrize("config", [
    {"layer_types": ["full_attention", "sliding_attention"], "sliding_window": 4},
    {"sliding_window": 4},
])
def test_a_sliding_layer_whose_window_is_not_passed_is_refused(config):
    module = _Module()
    module.config, module.layer_idx = type("Config", (), config)(), 1
    with pytest.raises(ValueError, match="sliding window"):
        AttentionInterface()[rat.ATTENTION](module, *_qkv(), None)
    module.config.use_sliding_window = False  # Qwen2's switch: no window asked
    if "layer_types" not in config:
        AttentionInterface()[rat.ATTENTION](module, *_qkv(), None)


def test_a_mask_function_that_lets_a_token_see_a_later_one_is_refused():
    """A bidirectional prefix or image-token overlay on the causal mask (transformers 5.x's
    block_sequence_ids, 4.x's or_mask_function) reaches the mask hook only as its function."""
    from transformers.masking_utils import causal_mask_function, or_masks

    def bidirectional(b, h, q_idx, kv_idx):
        return q_idx >= 0

    hook = AttentionMaskInterface()[rat.ATTENTION]
    prefix = torch.tensor([True, True, True, False, False, False])

    def prefix_lm(b, h, q_idx, kv_idx):
        return prefix[q_idx] & prefix[kv_idx]

    with pytest.raises(ValueError, match="later"):
        hook(batch_size=1, q_length=6, kv_length=6, mask_function=or_masks(causal_mask_function, prefix_lm))
    assert hook(batch_size=1, q_length=6, kv_length=6, mask_function=causal_mask_function) is None
    assert hook(batch_size=1, q_length=6, kv_length=6, mask_function=bidirectional,
                allow_is_bidirectional_skip=True) is None





def _model(family="llama", **config):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(family, **config), attn_implementation=rat.ATTENTION)


IDS = torch.arange(16)[None] % 100


def test_a_padding_mask_is_refused():
    mask = torch.ones_like(IDS)
    mask[0, :3] = 0
    with pytest.raises(ValueError, match="attention_mask pads"):
        _model()(input_ids=IDS, attention_mask=mask, use_cache=False)
    _model()(input_ids=IDS, attention_mask=torch.ones_like(IDS), use_cache=False)  # no padding: runs


def test_a_custom_4d_mask_is_refused():
    with pytest.raises(ValueError, match="attention_mask"):
        _model()(input_ids=IDS, attention_mask=torch.zeros(1, 1, 16, 16), use_cache=False)


def test_documents_packed_only_through_position_ids_are_refused():
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    with pytest.raises(ValueError, match="position_ids .*cu_seq_lens_q"):
        _model()(input_ids=IDS, position_ids=positions, use_cache=False)


def test_position_ids_changed_in_place_are_checked_again():
    """The check runs once per tensor (every layer gets the same one), not once for good."""
    model, positions = _model(), torch.arange(16)[None]
    model(input_ids=IDS, position_ids=positions, use_cache=False)
    positions[0, 8:] -= 8  # documents packed through position ids alone, in the same tensor
    with pytest.raises(ValueError, match="position_ids"):
        model(input_ids=IDS, position_ids=positions, use_cache=False)


def test_documents_with_positions_that_do_not_restart_are_refused():
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    with pytest.raises(ValueError, match="position_ids"):
        _model()(input_ids=IDS, position_ids=torch.arange(16)[None], cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                 use_cache=False)


@pytest.mark.parametrize("cu_k, match", [
    (torch.tensor([0, 7, 16], dtype=torch.int32), "differ"),
    (None, "together"),
])
def test_mismatched_cu_seq_lens_are_refused(cu_k, match):
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    positions = torch.cat([torch.arange(6), torch.arange(10)])[None]
    with pytest.raises(ValueError, match=match):
        _model()(input_ids=IDS, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu_k, use_cache=False)


def test_cu_seq_lens_not_covering_the_sequence_are_refused():
    cu = torch.tensor([0, 6, 15], dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seq_lens_q.*cu_seqlens must run from 0"):
        _model()(input_ids=IDS, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False)


def test_dropout_in_training_is_refused():
    model = _model(attention_dropout=0.1)
    model.eval()
    model(input_ids=IDS, use_cache=False)  # dropout is 0 outside training
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=IDS, use_cache=False)


def test_output_attentions_is_refused():
    with pytest.raises(ValueError, match="output_attentions"):
        _model()(input_ids=IDS, output_attentions=True, use_cache=False)


def _qkv(n_q=8, n_k=8):
    return torch.randn(1, 4, n_q, 16), torch.randn(1, 2, n_k, 16), torch.randn(1, 2, n_k, 16)


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("kwargs, match", [
    ({"softcap": 30.0}, "softcap"),
    ({"s_aux": torch.zeros(4)}, "s_aux"),
    ({"position_bias": torch.zeros(1, 4, 8, 8)}, "position_bias"),
])
def test_unknown_keywords_are_refused_by_name(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttentionInterface()[rat.ATTENTION](_Module(), *_qkv(), None, **kwargs)


def test_a_kv_cache_is_refused():
    with pytest.raises(ValueError, match="KV cache"):
        AttentionInterface()[rat.ATTENTION](_Module(), *_qkv(1, 8), None)


def test_a_window_on_non_causal_attention_is_refused():
    module = _Module()
    module.is_causal = False
    with pytest.raises(ValueError, match="sliding_window"):
        AttentionInterface()[rat.ATTENTION](module, *_qkv(), None, sliding_window=4)


@pytest.mark.parametrize("config, match", [
    ({"layer_types": ["full_attention", "chunked_attention"]}, "layer 1 is a 'chunked_attention' layer"),
    ({"attention_chunk_size": 8}, "attention_chunk_size=8"),
])
def test_layers_of_another_kind_are_refused(config, match):
    module = _Module()
    module.config, module.layer_idx = type("Config", (), config)(), 1
    with pytest.raises(ValueError, match=match):
        AttentionInterface()[rat.ATTENTION](module, *_qkv(), None)
    module.layer_idx = 0
    if "layer_types" in config:  # its full-attention layer runs
        AttentionInterface()[rat.ATTENTION](module, *_qkv(), None)


def test_a_mask_function_the_model_adds_is_refused():
    with pytest.raises(ValueError, match="mask function"):
        AttentionMaskInterface()[rat.ATTENTION](batch_size=1, q_length=8, kv_length=8, use_vmap=True)


def test_register_checks_its_arguments():
    with pytest.raises(TypeError, match="pattern"):
        rat.register("x", pattern=(16, 1))
    with pytest.raises(ValueError, match="group.*ring_size"):
        rat.register("x", group=object(), ring_size=2)
    with pytest.raises(ValueError, match="layout"):
        rat.register("x", layout="diagonal")


# --- gloo ranks ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cases() -> list[dict]:
    cases = []
    for layout in ("contiguous", "zigzag"):
        for family in FAMILIES:
            cases.append({"kind": "parity", "name": f"{family}-{layout}", "family": family, "layout": layout,
                          "documents": list(DOCUMENTS)})
        cases.append({"kind": "parity", "name": f"dilated-{layout}", "family": "qwen2", "layout": layout,
                      "pattern": [[16, 32], [1, 2]], "documents": [0, 32, 64]})
        cases.append({"kind": "parity", "name": f"float32-{layout}", "family": "mistral", "layout": layout,
                      "dtype": "float32"})
    cases.append({"kind": "parity", "name": "llama-documents", "family": "llama", "layout": "documents",
                  "documents": list(DOCUMENTS)})
    for what in ("positions", "padding"):
        cases.append({"kind": "bad", "name": f"bad-{what}", "what": what, "layout": "zigzag"})
    cases.append({"kind": "bad", "name": "reused-positions", "what": "reused", "layout": "zigzag"})
    return cases


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("transformers_ranks")
    cases = _cases()
    (tmp / "cases.json").write_text(json.dumps(cases))
    port, procs, logs = _free_port(), [], []
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        log = open(tmp / f"rank{rank}.log", "w")  # noqa: SIM115 - closed by wait_or_kill
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp / "cases.json"), str(tmp)],
                                      env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    if wait_or_kill(procs, logs, JOIN_TIMEOUT_S):
        pytest.fail(f"ranks still running after {JOIN_TIMEOUT_S}s:\n" + (tmp / "rank0.log").read_text()[-3000:])
    for rank, proc in enumerate(procs):
        assert proc.returncode == 0, (tmp / f"rank{rank}.log").read_text()[-3000:]
    results = [{r["name"]: r for r in json.loads((tmp / f"rank{rank}.json").read_text())} for rank in range(2)]
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("name", [c["name"] for c in _cases() if c["kind"] == "parity"])
def test_two_gloo_ranks_match_sdpa(two_ranks, name):
    dtype = torch.float32 if name.startswith("float32") else torch.float64
    for rank in range(2):
        result = two_ranks[rank][name]
        assert "error" not in result, result["error"]
        assert result["logits"] <= TOL[dtype] and result["gradient"] <= TOL[dtype], (rank, result)


@pytest.mark.distributed
@pytest.mark.parametrize("what, match", [("positions", "rank 1: position_ids"), ("padding", "rank 1: attention_mask")])
def test_one_rank_s_bad_input_raises_on_every_rank(two_ranks, what, match):
    for rank in range(2):
        raised = two_ranks[rank][f"bad-{what}"]["raised"]
        assert raised is not None and match in raised, (rank, raised)


@pytest.mark.distributed
def test_the_readme_example_runs_under_torchrun_and_matches_sdpa():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), "examples/transformers_context_parallel.py", "--layout", "zigzag"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=JOIN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    difference = float(done.stdout.rsplit("difference", 1)[1])
    assert difference <= 1e-9, done.stdout


@pytest.mark.distributed
def test_ranks_that_reuse_their_position_tensor_differently_agree_without_hanging(two_ranks):
    """Rank 0 passes one position tensor to two forwards, rank 1 a new one each time: their
    caches differ, their collectives must not."""
    for rank in range(2):
        assert two_ranks[rank]["reused-positions"]["raised"] is None, two_ranks[rank]


def test_a_registered_backend_does_not_keep_its_process_group_alive():
    """transformers holds a registered backend for the life of the process: a process group it
    kept alive past destroy_process_group would be torn down at exit, where gloo aborts."""
    script = (
        "import gc, weakref, torch.distributed as dist\n"
        "import ring_attention.integrations.transformers as rat\n"
        "dist.init_process_group('gloo', init_method='tcp://127.0.0.1:PORT', rank=0, world_size=1)\n"
        "backend = rat.register('ring_attention_pg', group=dist.group.WORLD)\n"
        "alive = weakref.ref(dist.group.WORLD)\n"
        "dist.destroy_process_group(); gc.collect()\n"
        "assert alive() is None, 'the backend keeps the process group alive'\n"
        "try:\n"
        "    backend.group\n"
        "except RuntimeError as error:\n"
        "    print('refused:', error)\n"
    ).replace("PORT", str(_free_port()))
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=JOIN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: ring_attention_pg: its process group was destroyed" in done.stdout
