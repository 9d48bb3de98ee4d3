"""Parity of a backend with transformers' own ``sdpa`` on a tiny random model.

The same randomly initialised model runs twice on one batch: with transformers' ``sdpa``
(the oracle; it builds its own causal, sliding-window and packed-document masks) and with a
ring_attention backend. For dilated attention the oracle is ``sdpa`` given the pattern's weights
as an additive mask, ``log W`` (``-inf`` where ``W = 0``, ``ln 2`` where a mixture pattern counts
a key twice), built from what the model passes to each layer. Under a process group each rank
runs the backend on its shard (input ids, position ids and pre-shifted labels sharded alike),
the loss is the sum over all tokens divided by their count, and parameter gradients are summed
over the ranks before they are compared.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ...layout import Layout, shard
from ...pattern import DilatedPattern, weights
from . import register

#: The model families :func:`tiny_config` builds.
FAMILIES = ("llama", "qwen2", "mistral")


@dataclasses.dataclass(frozen=True)
class Parity:
    """Largest absolute differences between a backend and the oracle."""

    family: str
    backend: str
    logits: float
    #: per parameter name
    gradients: dict[str, float]

    @property
    def gradient(self) -> float:
        """The largest over all parameters."""
        return max(self.gradients.values())

    def __str__(self) -> str:
        return f"{self.family:8s} {self.backend:28s} logits {self.logits:.2e}  gradients {self.gradient:.2e}"


def tiny_config(family: str, *, sliding_window: int = 16, **overrides: Any) -> Any:
    """A 2-layer random config of ``family`` (no download). Mistral uses ``sliding_window`` in
    every layer, Qwen2 in its second (its first keeps full attention); ``overrides`` replace
    config fields."""
    common: dict[str, Any] = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                                  attention_dropout=0.0, tie_word_embeddings=False,
                                  # wider than the default 0.02, so attention is far from uniform
                                  initializer_range=0.2)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**common, use_sliding_window=True, sliding_window=sliding_window, max_window_layers=1)
    if family == "mistral":
        return MistralConfig(**common, sliding_window=sliding_window)
    raise ValueError(f"unknown family {family!r}: expected one of {FAMILIES}")


def check_parity(family: str = "llama", *, pattern: DilatedPattern | None = None,
                 group: dist.ProcessGroup | None = None, ring_size: int | None = None,
                 layout: Layout | str = Layout.CONTIGUOUS, cu_seqlens: tuple[int, ...] | None = None,
                 seq_len: int = 64, batch: int = 1, dtype: torch.dtype = torch.float64,
                 sliding_window: int = 16, seed: int = 0) -> Parity:
    """Run a tiny random ``family`` model with transformers' ``sdpa`` and with a backend.

    :param family: ``"llama"``, ``"qwen2"`` or ``"mistral"`` (see :func:`tiny_config`).
    :param pattern, group, ring_size, layout: the backend, as :func:`register` takes them.
    :param cu_seqlens: packed documents (global offsets); the position ids restart at each.
    :param seq_len: ``N``, the whole sequence (each rank of ``group`` holds ``N / R``).
    :returns: the largest differences of the logits (this rank's) and of every gradient.
    """
    name = f"ring_attention_parity_{'dilated' if pattern else 'full'}"
    register(name, pattern=pattern, group=group, ring_size=ring_size, layout=layout)
    oracle = "sdpa"
    if pattern is not None:
        oracle = "ring_attention_parity_log_w"
        AttentionInterface.register(oracle, _LogWeights(pattern))

    config = tiny_config(family, sliding_window=sliding_window)
    torch.manual_seed(seed)
    # each model its own config: from_config sets the backend on the config it is given
    auto: Any = AutoModelForCausalLM
    reference = auto.from_config(copy.deepcopy(config), attn_implementation=oracle).to(dtype)
    ours = auto.from_config(copy.deepcopy(config), attn_implementation=name).to(dtype)
    ours.load_state_dict(reference.state_dict())

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=generator)
    bounds = (0, seq_len) if cu_seqlens is None else tuple(cu_seqlens)
    position_ids = torch.cat([torch.arange(b - a) for a, b in zip(bounds, bounds[1:])]).expand(batch, -1)
    labels = torch.full_like(input_ids, -100)  # shifted before sharding: token i predicts i + 1
    labels[:, :-1] = input_ids[:, 1:]
    labels[:, torch.tensor(bounds[1:-1], dtype=torch.long) - 1] = -100  # no prediction across a document end
    count = int((labels != -100).sum())
    extra: dict[str, Any] = {}
    if cu_seqlens is not None:
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = max(b - a for a, b in zip(bounds, bounds[1:]))
        extra = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)

    # transformers' sdpa builds its document mask from the restarting position ids; the log-W
    # oracle reads the documents from the call, as the backend does
    want_logits = _loss_backward(reference, input_ids, position_ids, labels, count, extra if pattern else {})
    if group is not None:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        input_ids, position_ids, labels = (shard(t, size, layout, dim=1, cu_seqlens=cu_seqlens)[rank]
                                           for t in (input_ids, position_ids, labels))
        want_logits = shard(want_logits, size, layout, dim=1, cu_seqlens=cu_seqlens)[rank]
    got_logits = _loss_backward(ours, input_ids, position_ids, labels, count, extra)
    gradients = {}
    for (pname, p_ref), p_ours in zip(reference.named_parameters(), ours.parameters()):
        grad = p_ours.grad if p_ours.grad is not None else torch.zeros_like(p_ours)
        if group is not None:
            dist.all_reduce(grad, group=group)
        want = p_ref.grad if p_ref.grad is not None else torch.zeros_like(p_ref)
        gradients[pname] = float((grad - want).abs().max())
    return Parity(family, name if pattern is None else f"{name} {pattern.mode}", float(
        (got_logits - want_logits).abs().max()), gradients)


def _loss_backward(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor,
                   count: int, extra: dict[str, Any]) -> torch.Tensor:
    logits: torch.Tensor = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra).logits
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.autograd.backward(loss / count)
    return logits.detach()


class _LogWeights:
    """transformers' ``sdpa`` with the pattern's ``log W`` as its additive mask."""

    def __init__(self, pattern: DilatedPattern) -> None:
        self.pattern = pattern

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 sliding_window: int | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
        cu = kwargs.get("cu_seq_lens_q")
        documents = None if cu is None else tuple(int(c) for c in cu.tolist())
        window = None if sliding_window is None else (sliding_window - 1, 0)
        w = weights(self.pattern, query.shape[2], query.shape[1], is_causal=getattr(module, "is_causal", True),
                    window=window, documents=documents)
        log_w = torch.where(w > 0, w.to(query.dtype).log(), -math.inf).to(query.dtype)
        out: torch.Tensor = sdpa_attention_forward(module, query, key, value, log_w.unsqueeze(0), dropout=dropout,
                                                   scaling=scaling, is_causal=False)[0]
        return out, None
