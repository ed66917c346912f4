"""LoraOneCallback: LoRA-One inside transformers' Trainer (and TRL's SFTTrainer), offline on a tiny Llama.

The independent check: the batches the callback used are recorded by the data collator, and the adapter that
the first optimizer step sees must equal (s / (gamma sigma1)) [-G]_r with G from plain autograd on a fresh copy of
the base model over those batches (and equal what ``peft_loraone.initialize`` gives on them).
"""

from __future__ import annotations

import ast
import logging
import math
import socket
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import VOCAB, MLP, delta_oi, lora_layers, loraone_delta, mlp_batches, reference_grads, tiny_llama

import peft_loraone
from peft_loraone import LoraOneConfig, LoraOneWarning

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator  # noqa: E402

from peft_loraone.callback import LoraOneCallback  # noqa: E402

pytestmark = [
    # transformers 5 renamed gradient checkpointing to activation checkpointing; its own code still calls the old names
    pytest.mark.filterwarnings("ignore:`gradient_checkpointing.*` is deprecated:FutureWarning"),
    pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"),
]



@pytest.fixture(autouse=True)
def _one_thread():
    """The tiny models run fastest on one thread; two threads on a busy 2-core machine were up to 20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# tight SVD settings: compared against an exact SVD
EXACT = LoraOneConfig(tol=1e-12, power_iters=60, progress=False, num_batches=3)
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


# ---------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------


def lm_examples(n: int = 12, seq: int = 8, distinct: int | None = None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """Causal-LM examples "each token is the previous one + 1" (labels = input_ids); ``distinct`` of them repeat."""
    g = torch.Generator().manual_seed(seed)
    starts = [int(torch.randint(0, VOCAB, (1,), generator=g)) for _ in range(distinct or n)]
    out = []
    for i in range(n):
        ids = (torch.arange(seq) + starts[i % len(starts)]) % VOCAB
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


class RecordingCollator:
    """Wraps a collator and keeps every batch it makes: ``before`` the training loop starts (the callback's pass)
    and ``during`` training (switched by :class:`Probe`, which runs after the LoRA-One callback)."""

    def __init__(self, inner=default_data_collator) -> None:
        self.inner = inner
        self.before: list[dict[str, torch.Tensor]] = []
        self.during: list[dict[str, torch.Tensor]] = []
        self.training = False

    def __call__(self, features):
        batch = self.inner(features)
        (self.during if self.training else self.before).append({k: v.clone() for k, v in batch.items()})
        return batch


class Probe(TrainerCallback):
    """Records what the first optimizer step sees: the adapter's delta weights, lora_A/lora_B and the optimizer
    state of the adapter's parameters."""

    def __init__(self, collator: RecordingCollator | None = None) -> None:
        self.collator = collator
        self.at_begin = None
        self.first_step = None
        self.optimizer_state = None
        self.optimizer_params = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.collator is not None:
            self.collator.training = True
        self.at_begin = _factors(model)

    def on_pre_optimizer_step(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.first_step is not None:
            return
        self.first_step = {n: delta_oi(layer) for n, layer in lora_layers(model).items()}
        self.first_factors = _factors(model)
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        self.optimizer_state = [dict(optimizer.state.get(p, {})) for p in lora]
        self.optimizer_params = {id(p) for group in optimizer.param_groups for p in group["params"]}


def _factors(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


#: The training arguments every trainer here shares (TrainingArguments and TRL's SFTConfig alike).
COMMON_ARGS = dict(
    learning_rate=5e-2,
    lr_scheduler_type="constant",
    report_to="none",
    use_cpu=True,
    logging_steps=1,
    save_strategy="no",
    disable_tqdm=True,
    seed=0,
)


def _args(tmp_path, **overrides) -> TrainingArguments:
    kwargs = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=2,
        max_steps=2,
        dataloader_num_workers=0,
        **COMMON_ARGS,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def _loraone_model(**lora):
    return get_peft_model(tiny_llama(), LoraConfig(**{**LORA, **lora}, init_lora_weights="loraone"))


def _assert_is_loraone_of(deltas, batches, gamma=128.0, rel=1e-4, frobenius=None):
    """``deltas`` (name -> delta weight) equal (s / (gamma sigma1)) [-G]_r, G by plain autograd on a fresh base:
    elementwise within ``rel`` of the largest entry, or, with ``frobenius``, within that relative Frobenius error."""
    scaling = 8 / 4
    grads = reference_grads(tiny_llama(), batches, deltas)
    assert len(deltas) == 14
    for name, got in deltas.items():
        expect = loraone_delta(grads[name], 4, scaling, gamma)
        if frobenius is not None:
            assert ((got - expect).norm() / expect.norm()).item() <= frobenius, name
        else:
            torch.testing.assert_close(got, expect, rtol=0, atol=rel * expect.abs().max().item(), msg=name)


def _assert_same_as_initialize(factors, batches, config=EXACT):
    ref = _loraone_model()
    peft_loraone.initialize(ref, batches, config=config)
    expect = _factors(ref)
    assert factors.keys() == expect.keys()
    for name in expect:
        torch.testing.assert_close(factors[name], expect[name], rtol=1e-5, atol=1e-7, msg=name)


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# ---------------------------------------------------------------------------------------------------------
# the Trainer route
# ---------------------------------------------------------------------------------------------------------


def test_trainer_initializes_before_the_first_optimizer_step(tmp_path, caplog):
    model = _loraone_model()
    collator = RecordingCollator()
    probe = Probe(collator)
    callback = LoraOneCallback(EXACT)
    # a plain RandomSampler seeded from torch's global RNG: the callback must restore it, or training would see
    # other batches than the ones G came from
    args = _args(tmp_path, accelerator_config={"use_seedable_sampler": False})
    trainer = Trainer(model=model, args=args, train_dataset=lm_examples(), data_collator=collator,
                      callbacks=[callback, probe])
    with caplog.at_level(logging.INFO, logger="peft_loraone.callback"):
        trainer.train()

    init_batches = collator.before[:3]
    # training starts on the very batches G came from, in the same order
    for a, b in zip(init_batches, collator.during[:3]):
        assert torch.equal(a["input_ids"], b["input_ids"])
    # what the first optimizer step saw: LoRA-One on those batches, by an independent computation ...
    _assert_is_loraone_of(probe.first_step, init_batches)
    # ... and exactly what initialize gives on them; on_train_begin already held it
    _assert_same_as_initialize(probe.first_factors, init_batches)
    for name, value in probe.at_begin.items():
        assert torch.equal(value, probe.first_factors[name]), name
    # the optimizer (created by the Trainer before on_train_begin) holds these Parameters, with no state yet
    lora = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    assert lora <= probe.optimizer_params
    assert all(s == {} for s in probe.optimizer_state)
    # then it trained them: Adam state for every LoRA parameter, two steps
    opt = trainer.optimizer
    states = [opt.state[p] for n, p in model.named_parameters() if "lora_" in n]
    assert all(float(s["step"]) == 2 for s in states)
    assert any(not torch.equal(p, probe.first_factors[n]) for n, p in model.named_parameters() if "lora_" in n)
    # the adapter is marked initialized (saves as a stock PEFT adapter), with a report
    assert model.peft_config["default"].init_lora_weights is True
    assert set(callback.reports) == {"default"} and callback.reports["default"].batches == 3
    assert "initialized with LoRA-One" in caplog.text


def test_optimizer_created_before_with_stale_state_and_loss_decreases(tmp_path, caplog):
    model = _loraone_model()
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for p in lora:  # moments left over from steps taken on the placeholder init
        opt.state[p] = {"step": torch.tensor(7.0), "exp_avg": torch.ones_like(p), "exp_avg_sq": torch.ones_like(p)}
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    probe = Probe()
    args = _args(tmp_path, per_device_train_batch_size=4, max_steps=5)
    trainer = Trainer(model=model, args=args, train_dataset=lm_examples(16, distinct=2), optimizers=(opt, sched),
                      callbacks=[LoraOneCallback(EXACT, num_batches=2), probe])
    with caplog.at_level(logging.WARNING, logger="peft_loraone.callback"):
        trainer.train()
    assert "dropped the optimizer state" in caplog.text
    # the user's optimizer holds the same Parameters and starts from zero moments at the LoRA-One factors
    assert {id(p) for p in lora} <= probe.optimizer_params
    assert all(s == {} for s in probe.optimizer_state)
    assert all(float(opt.state[p]["step"]) == 5 for p in lora)
    b_norms = [v.abs().max().item() for n, v in probe.first_factors.items() if "lora_B" in n]
    assert min(b_norms) > 0  # B != 0: not the placeholder
    losses = _losses(trainer)
    assert len(losses) == 5
    assert losses[-1] < losses[0] - 0.05, losses


def test_gradient_accumulation(tmp_path):
    model = _loraone_model()
    collator = RecordingCollator()
    probe = Probe(collator)
    config = LoraOneConfig(tol=1e-12, power_iters=60, progress=False)
    args = _args(tmp_path, gradient_accumulation_steps=2, max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=lm_examples(), data_collator=collator,
                      callbacks=[LoraOneCallback(config, num_batches=4), probe])
    trainer.train()
    init_batches = collator.before[:4]  # micro-batches, not accumulated steps
    _assert_is_loraone_of(probe.first_step, init_batches)
    assert trainer.state.global_step == 2
    assert len(collator.during) >= 4  # two micro-batches per optimizer step


@pytest.mark.parametrize(
    "train_mode, reentrant",
    [(False, None), (True, None), (True, True)],
    ids=["eval-pass", "train-pass", "train-pass-reentrant"],
)
def test_gradient_checkpointing(tmp_path, train_mode, reentrant):
    """With TrainingArguments(gradient_checkpointing=True) the checkpointed layers are recomputed in the backward
    pass (train mode): G must still be the plain gradient (the tiny Llama has no dropout, so train and eval mode
    give the same G)."""
    model = _loraone_model()
    collator = RecordingCollator()
    probe = Probe(collator)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LoraOneWarning)  # train_mode=True: "dropout is active" (there is none)
        config = LoraOneConfig(tol=1e-12, power_iters=60, progress=False, num_batches=2, train_mode=train_mode)
    gc_kwargs = None if reentrant is None else {"use_reentrant": reentrant}
    args = _args(tmp_path, gradient_checkpointing=True, gradient_checkpointing_kwargs=gc_kwargs, max_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=lm_examples(), data_collator=collator,
                      callbacks=[LoraOneCallback(config), probe])
    layer = model.base_model.model.model.layers[0]
    checkpointed = []  # len(collator.during) at each checkpointed call of the layer: 0 during the gradient pass
    original = layer.__class__.__call__

    def spy(self, *args, **kwargs):
        if self is layer and self.gradient_checkpointing and self.training:
            checkpointed.append(len(collator.during))
        return original(self, *args, **kwargs)

    cls = type(layer)
    own = cls.__dict__.get("__call__")
    cls.__call__ = spy
    try:
        trainer.train()
    finally:
        if own is None:
            del cls.__call__
        else:
            cls.__call__ = own
    # the gradient pass (before training's first batch) ran through checkpointed layers in train mode only
    assert checkpointed.count(0) == (2 if train_mode else 0)
    assert len(checkpointed) > checkpointed.count(0)  # training itself checkpoints
    _assert_is_loraone_of(probe.first_step, collator.before[:2])


def test_idempotent_and_resume_from_checkpoint(tmp_path, caplog):
    examples = lm_examples()
    model = _loraone_model()
    args = _args(tmp_path, max_steps=2, save_strategy="steps", save_steps=2)
    callback = LoraOneCallback(EXACT)
    trainer = Trainer(model=model, args=args, train_dataset=examples, callbacks=[callback])
    trainer.train()
    trained = _factors(model)
    report = callback.reports["default"]

    # resuming in a new process: a fresh "loraone" model; the Trainer loads the checkpoint's adapter before
    # on_train_begin, and the callback must not overwrite it
    checkpoint = Path(args.output_dir) / "checkpoint-2"
    assert checkpoint.is_dir()
    fresh = _loraone_model()
    callback2 = LoraOneCallback(EXACT)
    probe2 = Probe()
    trainer2 = Trainer(model=fresh, args=_args(tmp_path, max_steps=3), train_dataset=examples,
                       callbacks=[callback2, probe2])
    with caplog.at_level(logging.INFO, logger="peft_loraone.callback"):
        trainer2.train(resume_from_checkpoint=str(checkpoint))
    assert callback2.reports == {}
    assert "resumes at step 2" in caplog.text
    assert probe2.at_begin.keys() == trained.keys()
    for name, value in trained.items():
        assert torch.equal(probe2.at_begin[name], value), name
    assert fresh.peft_config["default"].init_lora_weights is True
    assert trainer2.state.global_step == 3

    # a second train() on the first model: already initialized, nothing recomputed
    probe = Probe()
    trainer.add_callback(probe)
    trainer.args.save_strategy = "no"
    trainer.train()
    assert callback.reports["default"] is report
    for name, value in trained.items():
        assert torch.equal(probe.at_begin[name], value), name


# ---------------------------------------------------------------------------------------------------------
# options and errors, on the hook itself (no Trainer needed)
# ---------------------------------------------------------------------------------------------------------


class _State:
    global_step = 0
    is_world_process_zero = True


def _mlp_model(init="loraone"):
    torch.manual_seed(0)
    return get_peft_model(MLP(), LoraConfig(r=2, lora_alpha=4, target_modules=["lin0", "lin1"], init_lora_weights=init))


def test_data_and_num_batches_options_and_adapter_name():
    batches = mlp_batches(5)
    model = _mlp_model()
    model.add_adapter("other", LoraConfig(r=2, target_modules=["lin0"], init_lora_weights="loraone"))
    callback = LoraOneCallback(LoraOneConfig(progress=False, tol=1e-12, power_iters=60), num_batches=2,
                               data=batches, adapter_name="default")
    assert callback.config.num_batches == 2
    callback.on_train_begin(None, _State(), None, model=model, train_dataloader=None)
    ref = _mlp_model()
    peft_loraone.initialize(ref, batches[:2], config=callback.config)
    got = {n: p for n, p in _factors(model).items() if ".default." in n}
    expect = _factors(ref)
    assert got.keys() == expect.keys()
    for name in expect:
        torch.testing.assert_close(got[name], expect[name], msg=name)
    assert callback.reports["default"].batches == 2
    assert model.peft_config["other"].init_lora_weights == "loraone"  # only the named adapter
    callback.on_train_begin(None, _State(), None, model=model, train_dataloader=None)  # idempotent
    assert callback.reports["default"].batches == 2


def test_train_step_callable_as_data():
    batches = iter(mlp_batches(2))
    model = _mlp_model()

    def train_step(m):
        b = next(batches)
        m(**b)["loss"].backward()

    callback = LoraOneCallback(LoraOneConfig(progress=False), num_batches=2, data=train_step)
    callback.on_train_begin(None, _State(), None, model=model)
    assert callback.reports["default"].batches == 2


def test_errors_and_no_op():
    with pytest.raises(TypeError, match="LoraOneConfig"):
        LoraOneCallback(config={"gamma": 1})
    with pytest.raises(ValueError, match="num_batches"):
        LoraOneCallback(num_batches=0)
    with pytest.raises(TypeError, match="PEFT LoRA model"):
        LoraOneCallback().on_train_begin(None, _State(), None, model=MLP(), train_dataloader=[])
    with pytest.raises(ValueError, match="no training dataloader"):
        LoraOneCallback().on_train_begin(None, _State(), None, model=_mlp_model(), train_dataloader=None)
    with pytest.raises(ValueError, match="not found"):
        LoraOneCallback(adapter_name="nope").on_train_begin(None, _State(), None, model=_mlp_model())
    plain = _mlp_model(init=True)
    callback = LoraOneCallback()
    callback.on_train_begin(None, _State(), None, model=plain, train_dataloader=mlp_batches(1))
    assert callback.reports == {}


def test_exported_lazily():
    """``import peft_loraone`` must not import the callback module (it imports transformers' Trainer classes)."""
    init = Path(peft_loraone.__file__).read_text()
    top_level = [n for n in ast.parse(init).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert not any(getattr(n, "module", None) == "callback" for n in top_level)
    assert "LoraOneCallback" in peft_loraone.__all__
    assert peft_loraone.LoraOneCallback is LoraOneCallback
    with pytest.raises(AttributeError):
        peft_loraone.NoSuchThing  # noqa: B018


def _dist_worker(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        model = _mlp_model()
        batches = mlp_batches(2, seed=10 + rank)  # every rank sees other data
        callback = LoraOneCallback(LoraOneConfig(progress=False), data=batches)
        callback.on_train_begin(None, _State(), None, model=model)
        flat = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_" in n])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert flat.abs().max() > 0
        for other in gathered:
            assert torch.equal(other, gathered[0])
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_starts_from_the_same_adapter():
    """Two gloo processes with different data: after the callback every replica holds the same factors."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port), nprocs=2, join=True)


# ---------------------------------------------------------------------------------------------------------
# TRL's SFTTrainer
# ---------------------------------------------------------------------------------------------------------


def _offline_tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t1", unk_token="t0")


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16-autocast"])
def test_trl_sft_trainer(tmp_path, bf16):
    """SFTTrainer with TRL's defaults (gradient checkpointing on; bf16 mixed precision, which TRL turns on by
    default, and fp32). Under mixed precision accelerate wraps the model's forward in autocast, so the callback's
    gradient pass runs in bf16 like the training's: the adapter then matches the fp32 reference to bf16 rounding."""
    trl = pytest.importorskip("trl", reason="TRL is not installed (pip install trl)")
    datasets = pytest.importorskip("datasets")
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    examples = lm_examples(16, distinct=2)
    train = datasets.Dataset.from_dict({"input_ids": [e["input_ids"].tolist() for e in examples]})
    collator = RecordingCollator(DataCollatorForLanguageModeling(pad_token_id=0))
    probe = Probe(collator)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "sft"),
        per_device_train_batch_size=4,
        max_steps=5,
        bf16=bf16,
        **COMMON_ARGS,
    )
    assert args.gradient_checkpointing
    trainer = trl.SFTTrainer(
        model=tiny_llama(),
        args=args,
        train_dataset=train,
        processing_class=_offline_tokenizer(),
        data_collator=collator,
        peft_config=LoraConfig(**LORA, init_lora_weights="loraone"),
        callbacks=[LoraOneCallback(EXACT, num_batches=2), probe],
    )
    trainer.train()
    init_batches = collator.before[:2]
    assert all(set(b) >= {"input_ids", "labels"} for b in init_batches)
    if bf16:
        _assert_is_loraone_of(probe.first_step, init_batches, frobenius=2e-2)
    else:
        _assert_is_loraone_of(probe.first_step, init_batches)
    assert trainer.model.peft_config["default"].init_lora_weights is True
    losses = _losses(trainer)
    assert len(losses) == 5 and losses[-1] < losses[0] - 0.05, losses
    assert all(math.isfinite(x) for x in losses)


def test_example_script_runs(tmp_path):
    """examples/trainer_callback.py, shortened: it trains, and stock PEFT reloads the adapter it saves."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "trainer_callback.py"
    spec = importlib.util.spec_from_file_location("trainer_callback_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = example.main(["--steps", "5", "--output", str(tmp_path)])
    assert len(out["losses"]) == 5 and all(math.isfinite(x) for x in out["losses"])
    assert len(out["report"].modules) == 14
    assert (Path(out["adapter_dir"]) / "adapter_config.json").is_file()
