"""The attention function and mask function registered with transformers.

transformers calls an attention backend as ``fn(module, query, key, value, attention_mask,
dropout=, scaling=, sliding_window=, **kwargs)`` with ``[B, H, S, D]`` tensors and takes back
``([B, S, H, D], weights)``; it builds ``attention_mask`` with the function registered under the
same name in ``AttentionMaskInterface`` (a backend missing there gets ``None``, padding and
all). :class:`Backend` is both: what the model asks for it honours exactly, or refuses with a
``ValueError`` naming it. Nothing is dropped silently:

- causal or not (``is_causal``, else ``module.is_causal``), the scale, grouped-query heads;
- ``sliding_window=W`` (keys ``j > i - W``): ``window=(W - 1, 0)`` with causal attention;
- packed documents from ``cu_seq_lens_q``/``cu_seq_lens_k`` (global offsets on a ring);
- ``position_ids`` must be the positions the attention computes with: the token's place in its
  document, in the ring's layout. Documents packed only through restarting position ids (the
  form transformers' ``sdpa`` mask infers them from) are refused: they need ``cu_seq_lens``;
- refused: padding masks, dense 4-D masks, dropout, ``softcap``, attention sinks, a KV cache
  holding more keys than queries, layers of another type than full or sliding attention
  (``config.layer_types``, ``attention_chunk_size``), any keyword this module does not know.

A mask function a model adds to the causal one (a bidirectional prefix, image tokens) is refused
where transformers says so (5.x's ``use_vmap=True``) and wherever it lets a token see a later
one (a probe along the superdiagonal). A window a layer holds without passing it is read from
the module; a sliding layer that reaches the call without one is refused.

Checks that depend on a rank's data (positions, padding) are agreed on by the group before
anyone raises, so every rank raises the same error and none waits in a collective.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist

from ...checks import check_documents
from ...entry import FULL, attend
from ...layout import Layout, shard
from ...masks import SequenceMask
from ...pattern import DilatedPattern
from ...ring_checks import collective_device

# Keywords models pass that change nothing here (``max_length_*`` restate ``cu_seq_lens``).
# The Trainer's ``num_items_in_batch`` and the output flags travel with every layer's call.
_IGNORED = frozenset({"max_length_q", "max_length_k", "use_cache", "cache_position", "output_attentions",
                      "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "return_dict", "num_items_in_batch",
                      "output_hidden_states", "output_router_logits"})


class Backend:
    """One registered backend: full attention (``pattern=None``) or dilated attention, on one
    device, a simulated ring (``ring_size``) or a process group (``group``: each rank holds its
    shard of the sequence in ``layout``)."""

    def __init__(self, name: str, *, pattern: DilatedPattern | None = None,
                 group: dist.ProcessGroup | None = None, ring_size: int | None = None,
                 layout: Layout | str = Layout.CONTIGUOUS, checkpoint: bool = False) -> None:
        if pattern is not None and not isinstance(pattern, DilatedPattern):
            raise TypeError(f"pattern must be a DilatedPattern or None, got {type(pattern).__name__}")
        if group is not None and ring_size is not None:
            raise ValueError("pass group (ranks of a process group) or ring_size (a simulated ring), not both")
        self.name = name
        self.pattern = pattern
        # Held weakly: transformers keeps a registered backend for the life of the process, and
        # a process group kept alive past destroy_process_group is torn down at interpreter
        # exit, where gloo's threads abort the process.
        self._group = None if group is None else weakref.ref(group)
        self.ring_size = ring_size
        self.layout = Layout.named(layout, "layout")
        self.checkpoint = checkpoint
        # position_ids are one tensor for every layer of a forward: checked once per tensor,
        # its version (an in-place change) and the documents it was checked against
        self._checked: tuple[weakref.ref[torch.Tensor], int, tuple[int, ...] | None] | None = None

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The process group each rank holds its shard in, or ``None``."""
        if self._group is None:
            return None
        group = self._group()
        if group is None:
            raise RuntimeError(f"{self.name}: its process group was destroyed; register the backend again "
                               "with the new group")
        return group

    def __repr__(self) -> str:
        where = f"group of {dist.get_world_size(self.group)}" if self.group is not None else \
            f"ring_size={self.ring_size}" if self.ring_size else "one device"
        return f"Backend({self.name!r}, pattern={self.pattern}, {where}, layout={self.layout})"

    # -- AttentionInterface --------------------------------------------------------------------

    def __call__(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 sliding_window: int | None = None, is_causal: bool | None = None,
                 **kwargs: Any) -> tuple[torch.Tensor, None]:
        causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
        self._refuse_unsupported(dropout, kwargs)
        layer_type = self._refuse_layer_type(module)
        if sliding_window is None:  # some models' layers hold their window without passing it
            sliding_window = getattr(module, "sliding_window", None)
        self._refuse_a_window_not_passed(module, layer_type, sliding_window)
        if query.shape[2] != key.shape[2]:
            raise ValueError(
                f"{self.name}: {key.shape[2]} keys for {query.shape[2]} queries (a KV cache, e.g. generation): "
                "ring attention is for training and prefill; pass use_cache=False"
            )
        ring = dist.get_world_size(self.group) if self.group is not None else 1
        documents, problem = None, None
        try:
            documents = _documents(kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k"), query.shape[2] * ring)
        except (TypeError, ValueError) as error:
            problem = f"cu_seq_lens_q/cu_seq_lens_k: {error}"
        if attention_mask is not None:
            problem = (f"attention_mask: {self.name} received a {attention_mask.dim()}-d mask it cannot honour "
                       "(a custom mask); pass attention_mask=None and pack documents with cu_seq_lens_q/k")
        if problem is None:
            problem = self._positions_problem(kwargs.get("position_ids"), query.shape[2], documents)
        self._agree(problem)  # one agreement per call on every rank, whatever each one's cache holds
        out = attend(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            FULL if self.pattern is None else self.pattern, group=self.group, ring_size=self.ring_size,
            causal=causal, scale=scaling, layout=self.layout, checkpoint=self.checkpoint,
            window=_window(sliding_window, causal, self.name), cu_seqlens=documents,
        )
        return out, None

    def _refuse_unsupported(self, dropout: float, kwargs: dict[str, Any]) -> None:
        if dropout:
            raise ValueError(f"{self.name}: attention dropout {dropout} is not supported; "
                             "set config.attention_dropout = 0.0")
        if kwargs.get("output_attentions"):
            raise ValueError(f"{self.name}: output_attentions=True: the attention weights are never formed")
        unknown = sorted(k for k, v in kwargs.items() if k not in _IGNORED and v is not None and v is not False)
        if unknown:
            raise ValueError(
                f"{self.name}: the model passes {', '.join(unknown)}, which {self.name} does not honour "
                "(e.g. softcap, attention sinks s_aux, position_bias): use transformers' own backends for it"
            )

    def _refuse_a_window_not_passed(self, module: torch.nn.Module, layer_type: str | None,
                                    window: int | None) -> None:
        """A layer whose config asks for a sliding window must reach the call with one."""
        if window is not None:
            return
        config = getattr(module, "config", None)
        configured = getattr(config, "sliding_window", None)
        if layer_type == "sliding_attention" or (
            layer_type is None and configured and getattr(config, "use_sliding_window", True)
        ):
            raise ValueError(
                f"{self.name}: the model's config asks for a sliding window (config.sliding_window={configured}) "
                f"but layer {getattr(module, 'layer_idx', '?')} passes none to its attention, so {self.name} cannot "
                "honour it: use transformers' own backends for this model"
            )

    def _refuse_layer_type(self, module: torch.nn.Module) -> str | None:
        """A layer whose mask is neither full nor a sliding window (Llama 4's chunked attention)
        would reach this backend with nothing in its arguments to say so: its config does."""
        config = getattr(module, "config", None)
        layer_types = getattr(config, "layer_types", None)
        index = getattr(module, "layer_idx", None)
        layer_type = layer_types[index] if isinstance(layer_types, (list, tuple)) and isinstance(index, int) \
            and 0 <= index < len(layer_types) else None
        if layer_type not in (None, "full_attention", "sliding_attention"):
            raise ValueError(f"{self.name}: layer {index} is a {layer_type!r} layer (config.layer_types), which "
                             f"{self.name} does not honour: it computes full and sliding-window attention")
        chunk = getattr(config, "attention_chunk_size", None)
        if layer_type is None and chunk:
            raise ValueError(f"{self.name}: config.attention_chunk_size={chunk} (chunked "
                             f"attention) is not honoured by {self.name}")
        return layer_type

    def _positions_problem(self, position_ids: object, local_len: int,
                           documents: tuple[int, ...] | None) -> str | None:
        """What is wrong with ``position_ids``, or ``None``: they must count from each document's
        start, in the layout's order. Checked once per tensor (every layer gets the same one), its
        version (an in-place change) and the documents it was checked against; the caller agrees
        on the answer with the group on every call."""
        if not isinstance(position_ids, torch.Tensor):
            return None
        seen = self._checked
        if seen is not None and seen[0]() is position_ids and seen[1:] == (position_ids._version, documents):
            return None
        ring = dist.get_world_size(self.group) if self.group is not None else 1
        expected = _positions(local_len * ring, documents)
        if self.group is not None:
            expected = shard(expected, ring, self.layout, dim=0, cu_seqlens=documents)[dist.get_rank(self.group)]
        if position_ids.dim() != 2 or position_ids.shape[-1] != local_len:
            return f"position_ids of shape {tuple(position_ids.shape)}: expected [B, {local_len}]"
        if not bool((position_ids == expected.to(position_ids.device)).all()):
            where = "this rank's shard of" if self.group is not None else "the"
            return (
                f"position_ids are not {where} positions the attention computes with (each token's place in its "
                "document" + ("" if documents is None else " of cu_seq_lens_q") + f", layout {self.layout}): documents "
                "packed through position ids need cu_seq_lens_q/cu_seq_lens_k (e.g. transformers' "
                "DataCollatorWithFlattening(return_flash_attn_kwargs=True))"
            )
        self._checked = (weakref.ref(position_ids), position_ids._version, documents)
        return None

    # -- AttentionMaskInterface ----------------------------------------------------------------

    def mask(self, batch_size: int, *args: Any, attention_mask: torch.Tensor | None = None,
             **kwargs: Any) -> None:
        """transformers' mask hook: there is no mask to build (causal, windows and documents are
        arguments of the attention call), so it returns ``None`` after refusing what it cannot
        honour: a padding mask, a mask function the model adds (``use_vmap``)."""
        problem = None
        if kwargs.get("use_vmap") or _sees_a_later_key(kwargs):
            problem = (f"{self.name}: the model adds its own mask function to the causal mask (e.g. "
                       "or_mask_function, block_sequence_ids: tokens that see later ones), which "
                       f"{self.name} cannot honour")
        elif attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
            problem = (f"attention_mask pads the batch, which {self.name} does not honour: pack the sequences "
                       "without padding and pass cu_seq_lens_q/cu_seq_lens_k instead")
        self._agree(problem)
        return None

    def _agree(self, problem: str | None) -> None:
        """Raise ``problem`` (from any rank of the group) on every rank."""
        if self.group is None:
            if problem is not None:
                raise ValueError(problem)
            return
        flag = torch.tensor([problem is not None], dtype=torch.int32, device=collective_device(self.group))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        if not flag.item():
            return
        problems: list[str | None] = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(problems, problem, group=self.group)
        raise ValueError("; ".join(f"rank {r}: {p}" for r, p in enumerate(problems) if p is not None))


def _sees_a_later_key(kwargs: dict[str, Any]) -> bool:
    """Whether the mask function of a causal mask lets some query see the key right after it:
    a model's overlay (a bidirectional prefix, image tokens) that the call's arguments do not
    carry. One vectorized probe along the superdiagonal (mask functions take index tensors)."""
    mask_function = kwargs.get("mask_function")
    if mask_function is None or "allow_is_bidirectional_skip" in kwargs:  # a bidirectional mask: all seen
        return False
    length = kwargs.get("q_length")
    if length is None:
        cache_position = kwargs.get("cache_position")
        length = len(cache_position) if isinstance(cache_position, torch.Tensor) else 0
    if length < 2:
        return False
    offset = int(kwargs.get("q_offset") or 0)
    i = torch.arange(length - 1, device=kwargs.get("device") or "cpu") + offset
    zero = torch.zeros_like(i)
    try:
        return bool(torch.as_tensor(mask_function(zero, zero, i, i + 1)).any())
    except Exception:  # noqa: BLE001 - a mask function that takes no index tensors cannot be checked
        return True


def _window(sliding_window: int | None, causal: bool, name: str) -> tuple[int, int] | None:
    """transformers' ``sliding_window=W`` keeps keys ``j > i - W``: flash-attn's ``(W - 1, 0)``."""
    if sliding_window is None:
        return None
    if not causal:
        raise ValueError(f"{name}: sliding_window={sliding_window} on non-causal attention is not supported")
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int, got {sliding_window!r}")
    return (sliding_window - 1, 0)


def _documents(cu_q: object, cu_k: object, seq_len: int) -> tuple[int, ...] | None:
    """The packed documents of ``cu_seq_lens_q``/``_k`` (self-attention: the two are equal),
    checked against the whole sequence's length ``seq_len``."""
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or cu_k is None:
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k must be passed together")
    bounds_q = check_documents(cu_q, seq_len)
    if check_documents(cu_k, seq_len) != bounds_q:
        raise ValueError("cu_seq_lens_q and cu_seq_lens_k differ: self-attention packs queries and keys alike")
    return bounds_q


def _positions(seq_len: int, documents: tuple[int, ...] | None) -> torch.Tensor:
    """Each global position's place in its document."""
    positions = torch.arange(seq_len)
    if documents is None:
        return positions
    return positions - torch.tensor(documents)[SequenceMask(documents=documents).document_ids(positions)]
