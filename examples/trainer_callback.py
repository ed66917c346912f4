"""LoRA-One inside a stock ``transformers.Trainer``: add ``LoraOneCallback`` and train; no separate pre-pass.

Runs offline in seconds on a tiny Llama built from a config (random weights, a toy "count up" language):

    python examples/trainer_callback.py [--steps 40] [--output /tmp/loraone-trainer]

When ``trainer.train()`` starts, the callback computes the one-step full gradient G on the first
``num_batches`` training batches, writes the LoRA-One factors into ``lora_A``/``lora_B`` (in place: the optimizer
the Trainer already made holds them), and training goes on. The saved adapter is a stock PEFT adapter. The same
callback works with TRL's ``SFTTrainer`` (``SFTTrainer(..., peft_config=LoraConfig(init_lora_weights="loraone"),
callbacks=[LoraOneCallback()])``).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

import peft_loraone
from peft_loraone import LoraOneCallback, LoraOneConfig

VOCAB = 64


def tiny_llama() -> torch.nn.Module:
    torch.manual_seed(0)
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


def count_up_data(n: int = 64, seq: int = 16) -> list[dict[str, torch.Tensor]]:
    """Sequences where every token is the previous one + 1 (mod VOCAB); labels = input_ids (causal LM)."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = (torch.arange(seq) + torch.randint(0, VOCAB, (1,), generator=g)) % VOCAB
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--output", default=None, help="where the Trainer writes (default: a temporary folder)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("peft_loraone").setLevel(logging.INFO)  # the callback logs its report table at INFO
    output = args.output or tempfile.mkdtemp(prefix="loraone-trainer-")
    start = time.perf_counter()

    lora = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules="all-linear", init_lora_weights="loraone")
    model = get_peft_model(tiny_llama(), lora)  # placeholder init (B = 0) until training starts
    training_args = TrainingArguments(
        output_dir=output,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=args.steps,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 5),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = LoraOneCallback(LoraOneConfig(gamma=16.0, progress=False), num_batches=8)
    trainer = Trainer(model=model, args=training_args, train_dataset=count_up_data(), callbacks=[callback])
    trainer.train()  # on_train_begin: LoRA-One from the first 8 micro-batches, then args.steps optimizer steps

    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    adapter_dir = os.path.join(output, "adapter")
    model.save_pretrained(adapter_dir)  # init_lora_weights=True in the saved config: stock PEFT loads it
    reloaded = PeftModel.from_pretrained(tiny_llama(), adapter_dir)
    print(f"LoRA-One initialized {len(callback.reports['default'].modules)} modules before the first step")
    print("training loss:", " -> ".join(f"{x:.3f}" for x in losses))
    print(f"adapter saved to {adapter_dir} (reloaded with stock PEFT: {type(reloaded).__name__}); "
          f"peft_loraone {peft_loraone.__version__}; {time.perf_counter() - start:.1f} s")
    return {"losses": losses, "report": callback.reports["default"], "adapter_dir": adapter_dir}


if __name__ == "__main__":
    torch.set_num_threads(1)  # a tiny model: one thread is fastest, and spares a busy machine oversubscription
    main()
