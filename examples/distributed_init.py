"""LoRA-One initialization across processes: every rank runs ``initialize`` on its shard, all get the same adapter.

Runs offline on the CPU (gloo) in under a minute on a tiny Llama built from a config:

    torchrun --nproc_per_node 2 examples/distributed_init.py [--capture sketch] [--wrap ddp|fsdp]
    accelerate launch --multi_gpu --num_processes 2 examples/distributed_init.py [...]   # also on a CPU-only machine
    python examples/distributed_init.py            # one process: the same adapter

(On a machine without GPUs ``accelerate launch --cpu`` or plain ``--num_processes 2`` starts one process, or needs
``mpirun``; ``--multi_gpu`` makes accelerate start the processes through torchrun, and the script then uses gloo.)
Both launchers set RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT; the script starts the process group from them (gloo on
the CPU, NCCL on GPUs), gives each rank its share of 8 global batches, and calls ``peft_loraone.initialize``. G is
the mean over all ranks' batches, so the adapter is the one a single process computes on the union of the shards:
with ``--check`` rank 0 recomputes that single-process adapter (``local_only``) and prints the largest relative
error of s·B·A over the modules. Only rank 0 logs the report.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import peft_loraone
from peft_loraone import LoraOneConfig
from peft_loraone._distributed import local_only

logger = logging.getLogger("distributed_init")
VOCAB = 64


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)  # the same base weights on every rank
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(cfg)


def global_batches(n: int = 8, batch: int = 4, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    """Count-up sequences (each token the previous + 1, mod VOCAB); labels = input_ids."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        start = torch.randint(0, VOCAB, (batch, 1), generator=g)
        ids = (start + torch.arange(seq)) % VOCAB
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def lora_model() -> torch.nn.Module:
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights="loraone")
    return get_peft_model(tiny_llama(), config)


def deltas(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """s·B·A of every LoRA layer (whole tensors also when FSDP shards them)."""
    from peft.tuners.lora import LoraLayer

    from peft_loraone._distributed import full

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and "default" in layer.r:
            b = full(layer.lora_B["default"].weight.detach()).double()
            a = full(layer.lora_A["default"].weight.detach()).double()
            out[name] = layer.scaling["default"] * b @ a
    return out


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", default="dense", choices=["dense", "sketch", "weight"])
    parser.add_argument("--wrap", default="none", choices=["none", "ddp", "fsdp"], help="wrap the model first")
    parser.add_argument("--check", action="store_true", help="rank 0 compares with the single-process adapter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if args.wrap != "none" and not dist.is_initialized():
        parser.error("--wrap needs a process group: start the script with torchrun or accelerate launch")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))

    batches = global_batches()
    share = batches[rank::world]  # this rank's shard: what a DistributedSampler would give it
    model = lora_model()
    wrapped = model
    if args.wrap == "ddp":
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
    elif args.wrap == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    config = LoraOneConfig(capture=args.capture, num_batches=len(share), progress=False)
    report = peft_loraone.initialize(wrapped, share, config=config)
    if rank == 0:
        logger.info("%s", report)

    error = 0.0
    if args.check:
        got = deltas(model)
        if rank == 0:
            with local_only():
                single = lora_model()
                peft_loraone.initialize(single, batches, config=dataclasses.replace(config, num_batches=len(batches)))
            expect = deltas(single)
            error = max(float((got[n] - expect[n]).norm() / expect[n].norm()) for n in expect)
            logger.info("rank 0 of %d: largest relative error of s·B·A against one process on all 8 batches: %.2e",
                        world, error)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return error


if __name__ == "__main__":
    main()
