"""Reconstruction of a converted language model under torchrun, for tests/test_distributed.py (gloo, CPU):

    torchrun --nproc_per_node=2 reconstruct_run.py OUT [--no-shard | --head-unsharded]
    python reconstruct_run.py OUT --batch-size 8      (one process: the reference)

A tiny Llama is converted (RMSNorms kept) and, unless ``--no-shard``, both it and its original are
sharded with FSDP2: each decoder layer and the LM head with ``fully_shard``, then the root
(``--head-unsharded``: the head is left to the root's shard, which reconstruct refuses). Every
rank is given the same 16 token sequences; reconstruct splits them into per-rank batches. At the
end every rank gathers the full weights to OUT/final-rank{RANK}.pt, with reconstruct's result, and
OUT/shards-rank{RANK}.json records the shape of its own shard of each parameter.
"""

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from fsdp_run import shard_shapes  # this script's folder is on the path, as torchrun runs it
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from transformers import LlamaConfig, LlamaForCausalLM

import cosconvert

SEQUENCES, LENGTH, VOCAB, STEPS = 16, 12, 48, 30


def original() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (SEQUENCES, LENGTH), generator=torch.Generator().manual_seed(1))


def shard(model: LlamaForCausalLM, head: bool) -> None:
    for layer in model.model.layers:
        fully_shard(layer)
    if head:
        fully_shard(model.lm_head)
    fully_shard(model)


def main() -> None:
    out, args = Path(sys.argv[1]), sys.argv
    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    teacher = original()
    model = cosconvert.convert(teacher, example_inputs=(tokens()[:2],))
    if distributed and "--no-shard" not in args:
        shard(model, head="--head-unsharded" not in args)
        shard(teacher, head=False)
    (out / f"shards-rank{rank}.json").write_text(json.dumps(shard_shapes(model)))
    batch = int(args[args.index("--batch-size") + 1]) if "--batch-size" in args else 4
    torch.manual_seed(2)  # the batch order: the same on every rank and in the one-process reference
    result = cosconvert.reconstruct(model, teacher, tokens(), steps=STEPS, batch_size=batch, lr=3e-3)
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if distributed else model.state_dict()
    torch.save({k: v.detach().clone() for k, v in full.items()}, out / f"final-rank{rank}.pt")
    (out / f"result-rank{rank}.json").write_text(json.dumps(result["blocks"]))
    if distributed:
        dist.barrier()  # no rank closes its connections while another still uses them
        dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
