"""Hugging Face transformers attention backends (``pip install ring-attention[transformers]``).

Importing this module registers :data:`ATTENTION` (full attention on one device), so any model
that takes ``attn_implementation`` can use it::

    import ring_attention.integrations.transformers as rat
    model = AutoModelForCausalLM.from_config(config, attn_implementation=rat.ATTENTION)

:func:`register` adds a backend of your own: dilated attention (``pattern=``), a simulated
ring (``ring_size=``) or context parallelism over a process group (``group=``, each rank holding
its shard of the sequence, see the README), under a name of your choice. Each backend is
registered with transformers' public ``AttentionInterface`` and ``AttentionMaskInterface`` (so a
padding mask reaches it and is refused, never dropped). What a backend honours and what it
refuses: :mod:`ring_attention.integrations.transformers.backend`.

:func:`check_parity` (and ``python -m ring_attention.integrations.transformers --check``) runs
a tiny random model with transformers' ``sdpa`` and with a backend and reports the largest
differences of the logits and of every parameter gradient.
"""

from __future__ import annotations

try:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
except ImportError as error:  # pragma: no cover - the extra is absent
    raise ImportError(
        "ring_attention.integrations.transformers needs transformers >= 4.57: "
        "pip install 'ring-attention[transformers]'"
    ) from error

import torch.distributed as dist

from ...layout import Layout
from ...pattern import DilatedPattern
from .backend import Backend

#: Full attention on one device, registered on import.
ATTENTION = "ring_attention"


def register(name: str, *, pattern: DilatedPattern | None = None, group: dist.ProcessGroup | None = None,
             ring_size: int | None = None, layout: Layout | str = Layout.CONTIGUOUS,
             checkpoint: bool = False) -> Backend:
    """Register a backend under ``name`` for ``attn_implementation=name``.

    :param name: the name models take; registering a name again replaces its backend.
    :param pattern: a :class:`~ring_attention.DilatedPattern` for dilated attention over the
        model's heads, or ``None`` for full attention.
    :param group: context parallelism: a process group whose ranks each hold their shard of
        every sequence (``N / R`` tokens, in ``layout``), with ``position_ids`` the global
        positions of that shard (:func:`ring_attention.shard` of ``arange(N)``).
    :param ring_size: a ring simulated in this process on the whole sequence (tests, plans).
    :param layout: the shard layout with ``group``: ``"contiguous"``, ``"zigzag"`` or ``"documents"``.
    :param checkpoint: recompute the attention in backward instead of storing it.
    :returns: the registered :class:`~ring_attention.integrations.transformers.backend.Backend`.
    """
    backend = Backend(name, pattern=pattern, group=group, ring_size=ring_size, layout=layout, checkpoint=checkpoint)
    AttentionInterface.register(name, backend)
    AttentionMaskInterface.register(name, backend.mask)
    return backend


register(ATTENTION)

from .parity import Parity, check_parity  # noqa: E402  (it registers backends itself)

__all__ = ["ATTENTION", "Backend", "Parity", "check_parity", "register"]
