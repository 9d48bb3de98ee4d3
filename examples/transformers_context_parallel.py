"""Context parallelism for a Hugging Face transformers model: each rank holds its shard of the sequence.

    torchrun --nproc_per_node 2 examples/transformers_context_parallel.py [--layout zigzag]

Every rank builds the same model and batch (three packed documents), takes its shard of the
tokens, position ids and labels, runs the model through ring attention, and sums the loss and
the gradients over the ranks. Rank 0 then checks the loss against transformers' own ``sdpa`` on
the whole sequence in one process.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, LlamaConfig

import ring_attention as ra
import ring_attention.integrations.transformers as rat


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layout", default="contiguous", choices=("contiguous", "zigzag", "documents"))
    args = parser.parse_args()
    dist.init_process_group("gloo")  # "nccl" on GPUs (with torch.cuda.set_device(local_rank))
    ranks, rank = dist.get_world_size(), dist.get_rank()
    rat.register("ring", group=dist.group.WORLD, layout=args.layout)

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)  # the same weights on every rank
    model = AutoModelForCausalLM.from_config(config, attn_implementation="ring").double()

    # One packed batch: cu_seqlens are global offsets; position ids restart at every document;
    # labels are shifted on the whole sequence before sharding (token i predicts i + 1).
    documents = (0, 100, 180, 256)
    cu = torch.tensor(documents, dtype=torch.int32)
    input_ids = torch.randint(0, 128, (1, documents[-1]), generator=torch.Generator().manual_seed(1))
    position_ids = torch.cat([torch.arange(b - a) for a, b in zip(documents, documents[1:])])[None]
    labels = input_ids.roll(-1, dims=1)
    labels[:, [end - 1 for end in documents[1:]]] = -100  # nothing to predict past a document's end
    count = int((labels != -100).sum())

    ids, positions, targets = (ra.shard(t, ranks, args.layout, cu_seqlens=cu)[rank]
                               for t in (input_ids, position_ids, labels))
    logits = model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu, use_cache=False).logits
    loss = F.cross_entropy(logits[0], targets[0], ignore_index=-100, reduction="sum") / count
    loss.backward()
    for p in model.parameters():  # DDP / FSDP over the context-parallel group do this for you
        dist.all_reduce(p.grad)
    total = loss.detach().clone()
    dist.all_reduce(total)

    if rank == 0:
        sdpa = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double()
        sdpa.load_state_dict(model.state_dict())
        whole = sdpa(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        want = F.cross_entropy(whole[0], labels[0], ignore_index=-100, reduction="sum") / count
        print(f"{ranks} ranks, {args.layout} layout: loss {total.item():.12f}, "
              f"sdpa on one process {want.item():.12f}, difference {abs(total - want).item():.1e}")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
