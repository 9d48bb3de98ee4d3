"""Point-to-point exchange between the ranks of a ring, distributed or simulated.

Every ring algorithm here is written once against :class:`Ring`: a loop over the steps,
and inside it a loop over ``ring.ranks``, the ranks this process runs. A
:class:`ProcessGroupRing` runs one rank and moves tensors with batched P2P
(``torch.distributed.batch_isend_irecv``); a :class:`SimulatedRing` runs every rank in
one process, one after another, and "moves" a tensor by handing it to the receiving
rank's slot. The kernels and merges are the same code in both, so what a one-device
benchmark measures is what a rank runs.

An exchange is a *shift*: every rank ``r`` sends to ``(r + shift) % R`` and receives
from ``(r - shift) % R``. All ranks post the same shifts in the same order, each shift
as one batch of P2P operations, so there is a single send/recv order and no deadlock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.distributed as dist

# What a receiver expects from a sender: a list of (shape, dtype) per tensor.
Spec = Sequence[tuple[tuple[int, ...], torch.dtype]]


class Pending:
    """An exchange in flight; :meth:`wait` returns ``{rank: [received tensors]}``."""

    def __init__(
        self, received: dict[int, list[torch.Tensor]], requests: Iterable[dist.Work] = (),
        keep_alive: Sequence[torch.Tensor] = (),
    ) -> None:
        self._received = received
        self._requests = list(requests)
        self._keep_alive = keep_alive  # send buffers must live until the transfer is done

    def wait(self) -> dict[int, list[torch.Tensor]]:
        for req in self._requests:
            req.wait()
        self._requests, self._keep_alive = [], ()
        return self._received


class Ring:
    """A ring of ``size`` ranks, of which this process runs ``ranks``."""

    size: int
    ranks: tuple[int, ...]

    def exchange(
        self, shift: int, sends: Mapping[int, Sequence[torch.Tensor]], specs: Mapping[int, Spec],
        device: torch.device,
    ) -> Pending:
        """Every run rank ``r`` sends ``sends[r]`` to ``(r+shift) % R`` and receives ``specs[r]``.

        A rank missing from ``sends`` (``specs``) sends (receives) nothing at this shift;
        the plans on both sides agree on that, so nothing waits for a message never sent.
        """
        raise NotImplementedError


class SimulatedRing(Ring):
    """All ``size`` ranks in this process; an exchange is a hand-over, no copy."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ranks = tuple(range(size))

    def exchange(
        self, shift: int, sends: Mapping[int, Sequence[torch.Tensor]], specs: Mapping[int, Spec],
        device: torch.device,
    ) -> Pending:
        received: dict[int, list[torch.Tensor]] = {}
        for r, spec in specs.items():
            got = sends[(r - shift) % self.size]
            # A process group receives into buffers built from the spec: a sender whose
            # shapes or dtypes differ would fail or be misread there, so it fails here too.
            sent = [(tuple(t.shape), t.dtype) for t in got]
            expected = [(tuple(shape), dtype) for shape, dtype in spec]
            if sent != expected:
                i = next(
                    (i for i, (a, b) in enumerate(zip(sent, expected)) if a != b),
                    min(len(sent), len(expected)),  # else one list is a prefix of the other
                )
                raise RuntimeError(
                    f"ring plan mismatch: rank {(r - shift) % self.size} sends {len(sent)} tensors, "
                    f"rank {r} expects {len(expected)}; tensor {i}: sent "
                    f"{sent[i] if i < len(sent) else 'nothing'}, expected "
                    f"{expected[i] if i < len(expected) else 'nothing'} (shape, dtype)"
                )
            received[r] = list(got)
        return Pending(received)


class ProcessGroupRing(Ring):
    """This process is one rank of ``group``; tensors travel by batched P2P."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError("a process group was given but torch.distributed is not initialized")
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.ranks = (self.rank,)

    def _global(self, group_rank: int) -> int:
        return dist.get_global_rank(self.group, group_rank) if self.group is not None else group_rank

    def exchange(
        self, shift: int, sends: Mapping[int, Sequence[torch.Tensor]], specs: Mapping[int, Spec],
        device: torch.device,
    ) -> Pending:
        me = self.rank
        dst, src = self._global((me + shift) % self.size), self._global((me - shift) % self.size)
        outgoing = [t.contiguous() for t in sends.get(me, ())]
        incoming = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in specs.get(me, ())]
        ops = [dist.P2POp(dist.isend, t, dst, self.group) for t in outgoing]
        ops += [dist.P2POp(dist.irecv, t, src, self.group) for t in incoming]
        requests = dist.batch_isend_irecv(ops) if ops else []
        return Pending({me: incoming} if me in specs else {}, requests, outgoing)

