"""One rank of a gloo group running a transformers model, run as a script by
tests/test_integrations_transformers.py.

    RANK=r WORLD_SIZE=R MASTER_ADDR=127.0.0.1 MASTER_PORT=p python tests/transformers_worker.py CASES OUT

Every rank runs the JSON list ``CASES`` in order and writes ``OUT/rank{r}.json`` after each:

- ``parity``: :func:`check_parity` of ``family`` on this rank's shard in ``layout`` (optional
  ``pattern`` ``[segments, rates]``, ``documents``, ``dtype``): the largest differences.
- ``bad``: rank 1 alone passes a wrong input (``position_ids`` off by one, or a padding
  ``attention_mask``), or (``reused``) two forwards where rank 0 passes one position tensor
  twice and rank 1 a new one; records what each rank raised (``None`` if nothing).
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import traceback

import torch
import torch.distributed as dist

import ring_attention as ra
import ring_attention.integrations.transformers as rat
from ring_attention.integrations.transformers.parity import tiny_config


def _parity(case: dict) -> dict:
    pattern = None
    if case.get("pattern"):
        segments, rates = case["pattern"]
        pattern = ra.DilatedPattern(segment_lengths=tuple(segments), dilation_rates=tuple(rates))
    documents = tuple(case["documents"]) if case.get("documents") else None
    parity = rat.check_parity(case["family"], pattern=pattern, group=dist.group.WORLD, layout=case["layout"],
                              cu_seqlens=documents, dtype=getattr(torch, case.get("dtype", "float64")))
    return {"logits": parity.logits, "gradient": parity.gradient}


def _bad(case: dict) -> dict:
    from transformers import AutoModelForCausalLM

    size, rank = dist.get_world_size(), dist.get_rank()
    rat.register("ring_attention_worker", group=dist.group.WORLD, layout=case["layout"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="ring_attention_worker")
    n = 32
    ids = ra.shard(torch.arange(n)[None] % 100, size, case["layout"])[rank]
    positions = ra.shard(torch.arange(n)[None], size, case["layout"])[rank]
    mask = torch.ones_like(ids)
    if rank == 1 and case["what"] == "positions":
        positions = positions + 1
    if rank == 1 and case["what"] == "padding":
        mask[0, -1] = 0
    try:
        model(input_ids=ids, position_ids=positions, attention_mask=mask, use_cache=False)
        if case["what"] == "reused":  # rank 0: the same tensor again (its cache hits); rank 1: a new one
            model(input_ids=ids, position_ids=positions if rank == 0 else positions.clone(), use_cache=False)
    except Exception as error:  # noqa: BLE001 - recorded for the test to judge
        return {"raised": f"{type(error).__name__}: {error}"}
    return {"raised": None}


def main(cases_path: str, out: str) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = dist.get_rank()
    results = []
    for case in json.loads(open(cases_path).read()):
        try:
            result = _parity(case) if case["kind"] == "parity" else _bad(case)
        except Exception:  # noqa: BLE001
            result = {"error": traceback.format_exc()}
        results.append({"name": case["name"], **result})
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
