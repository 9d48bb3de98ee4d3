"""Every rank's plan seen together, as one ring-wide schedule: what tests of plans inspect."""

from __future__ import annotations

import dataclasses

from ring_attention.plans import ring_plans


@dataclasses.dataclass
class StepView:
    shift: int
    sends: dict  # rank -> messages it sends to rank + shift
    blocks: dict  # rank -> blocks it computes with what rank - shift sent


@dataclasses.dataclass
class PlanView:
    local: dict  # rank -> local blocks
    steps: tuple[StepView, ...]  # shifts with any traffic, in order


def plan_view(pattern, n, h, hkv, causal, ring_size, layout) -> PlanView:
    plans = ring_plans(pattern, n, h, hkv, causal, ring_size, layout, tuple(range(ring_size)))
    steps = []
    for shift in range(1, ring_size):
        sends = {p.rank: p.steps[shift].sends for p in plans if shift in p.steps and p.steps[shift].sends}
        blocks = {p.rank: p.steps[shift].blocks for p in plans if shift in p.steps and p.steps[shift].blocks}
        if sends or blocks:
            steps.append(StepView(shift, sends, blocks))
    return PlanView({p.rank: p.local for p in plans}, tuple(steps))
