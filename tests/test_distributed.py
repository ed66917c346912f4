"""LoRA-One initialization across torch.distributed ranks (gloo, CPU): every rank's adapter is the single-process
adapter of the union of all ranks' batches, for any world size; a failing rank makes every rank raise.

Process launches are expensive here (each rank imports torch, transformers and peft: 10-20 s on 2 cores), so one
launch of 3 processes runs every case: 3 ranks (dense, sketch), then 2 of them in a new group (dense, sketch one and
two passes, weight, DDP-wrapped, FSDP2-sharded, a failing rank with and without FSDP, and a rank that never arrives:
the agreement's timeout). Each rank saves what it got; the checks run in the parent against oracles computed there
(single-process ``initialize`` on the 6 global batches, and for dense G the exact SVD of the autograd gradient).
"""

from __future__ import annotations

import dataclasses

import os
import socket
import time
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from plugin_models import lora_layers, loraone_delta, reference_grads, relative_error, tiny_llama, token_batches

import peft_loraone
from peft_loraone import LoraOneConfig
from peft_loraone._distributed import Traffic, assign_owners, full

GLOBAL_BATCHES = 6
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="loraone")
CONFIGS = {
    "dense": dict(capture="dense", tol=1e-12, power_iters=60),
    "weight": dict(capture="weight", tol=1e-12, power_iters=60),
    "sketch": dict(capture="sketch", sketch_passes=1, sketch_size=10, sketch_dense_fallback=False),
    "sketch2": dict(capture="sketch", sketch_passes=2, sketch_size=10, sketch_dense_fallback=False),
}
FAIL_MESSAGE = "corrupt shard on purpose"


def _config(case: str) -> LoraOneConfig:
    return LoraOneConfig(progress=False, num_batches=GLOBAL_BATCHES, **CONFIGS[case])


def _model():
    return get_peft_model(tiny_llama(), LoraConfig(**LORA))


def _batches():
    return token_batches(GLOBAL_BATCHES, batch=2, seq=8, seed=3)


def _adapter(model) -> dict[str, torch.Tensor]:
    """The adapter's tensors, whole (FSDP's shards gathered: a collective, every rank calls it)."""
    return {n: full(p.detach()).clone() for n, p in model.named_parameters() if "lora_" in n}


def _deltas(model) -> dict[str, torch.Tensor]:
    """s·B·A per LoRA layer (float64); the tiny Llama has no Conv1D, so (out, in) as stored."""
    out = {}
    for n, layer in lora_layers(model).items():
        b = full(layer.lora_B["default"].weight.detach()).double()
        a = full(layer.lora_A["default"].weight.detach()).double()
        out[n] = layer.scaling["default"] * b @ a
    return out


def _fsdp(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model.base_model.model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


# ---------------------------------------------------------------------------------------------------------
# the ranks
# ---------------------------------------------------------------------------------------------------------


def _case(case: str, rank: int, world: int, share: list) -> dict:
    import torch.distributed as dist

    model = _model()
    if case.startswith("fsdp"):
        _fsdp(model)
    if case in ("fail", "fsdp_fail"):
        def data():  # rank 1's shard breaks after one batch
            yield share[0]
            if rank == 1:
                raise ValueError(FAIL_MESSAGE)
            yield from share[1:]

        peft_loraone.initialize(model, data(), config=_config("dense"))
        return {}
    if case == "timeout":  # rank 0 calls initialize, the others never do
        if rank == 0:  # the config's 3 s wins over the environment's 60 s set for every case
            config = dataclasses.replace(_config("dense"), dist_timeout=3.0)
            peft_loraone.initialize(model, share, config=config)
        else:
            time.sleep(5)
        return {}
    target = model
    if case == "ddp":
        target = torch.nn.parallel.DistributedDataParallel(model)
    mode = {"ddp": "dense", "fsdp": "dense", "fsdp_sketch": "sketch"}.get(case, case)
    report = peft_loraone.initialize(target, share, config=_config(mode))
    assert dist.is_initialized()
    return {
        "adapter": _adapter(model),
        "deltas": _deltas(model),
        "batches": report.batches,
        "samples": report.samples,
        "world_size": report.world_size,
        "sent": report.sent_bytes,
        "received": report.received_bytes,
        "table": str(report),
        "modes": sorted({m.capture for m in report.modules}),
    }


PLAN = [  # (world size, cases): one launch of 3 processes runs both groups, the third rank leaves after the first
    (3, ["dense", "sketch"]),
    # dense after the failures: the group still works
    (2, ["sketch", "sketch2", "weight", "ddp", "fsdp", "fsdp_sketch", "fsdp_fail", "fail", "dense", "timeout"]),
]


def _worker(rank: int, ports: list[int], out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    batches = _batches()
    for (world, cases), port in zip(PLAN, ports):
        if rank >= world:
            return
        os.environ["PEFT_LORAONE_DIST_TIMEOUT"] = "60"
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        share = batches[rank * GLOBAL_BATCHES // world : (rank + 1) * GLOBAL_BATCHES // world]
        results = {}
        for case in cases:
            start = time.monotonic()
            try:
                results[case] = _case(case, rank, world, share)
            except Exception as exc:  # noqa: BLE001 - recorded for the parent to check
                results[case] = {"error": type(exc).__name__, "message": str(exc)}
            results[case]["seconds"] = time.monotonic() - start
        torch.save(results, Path(out_dir) / f"world{world}_rank{rank}.pt")
        if "timeout" in cases:
            os._exit(0)  # a collective of rank 0 timed out: tearing the group down could wait on it
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> dict[int, list[dict]]:
    """``{world size: [rank 0's results, rank 1's, ...]}``."""
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ranks")
    ports = []
    for _ in PLAN:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
    mp.spawn(_worker, args=(ports, str(out)), nprocs=max(w for w, _ in PLAN), join=True)
    return {w: [torch.load(out / f"world{w}_rank{r}.pt", weights_only=False) for r in range(w)] for w, _ in PLAN}


@pytest.fixture(scope="module")
def two_ranks(launched):
    return launched[2]


@pytest.fixture(scope="module")
def three_ranks(launched):
    return launched[3]


@pytest.fixture(scope="module")
def oracle():
    """Single-process adapters on the union of the batches, per capture mode, and the exact dense oracle."""
    batches = _batches()
    out = {}
    for case in CONFIGS:
        model = _model()
        report = peft_loraone.initialize(model, batches, config=_config(case))
        assert report.world_size == 1 and report.sent_bytes == report.received_bytes == 0
        out[case] = {"deltas": _deltas(model), "samples": report.samples}
    layers = lora_layers(_model())
    grads = reference_grads(tiny_llama(), batches, list(layers))
    out["exact"] = {n: loraone_delta(grads[n], LORA["r"], layers[n].scaling["default"]) for n in layers}
    return out


def _assert_same_adapter(got: dict, expect: dict, tol: float = 1e-5) -> None:
    assert got.keys() == expect.keys() and got
    errors = {n: relative_error(got[n], expect[n]) for n in expect}
    assert max(errors.values()) <= tol, errors


def _assert_ranks_identical(results: list[dict], case: str) -> None:
    first = results[0][case]["adapter"]
    for other in results[1:]:
        assert other[case]["adapter"].keys() == first.keys()
        for name, value in first.items():
            assert torch.equal(other[case]["adapter"][name], value), (case, name)


# ---------------------------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["dense", "sketch", "sketch2", "weight", "ddp", "fsdp", "fsdp_sketch"])
def test_two_ranks_equal_the_single_process_adapter(two_ranks, oracle, case):
    """DDP-wrapped and FSDP2-sharded (``fully_shard`` on the decoder layers and the root) included: the activation
    capture needs neither whole weights nor W.grad."""
    for r, results in enumerate(two_ranks):
        got = results[case]
        assert "error" not in got, got
        mode = {"ddp": "dense", "fsdp": "dense", "fsdp_sketch": "sketch"}.get(case, case)
        _assert_same_adapter(got["deltas"], oracle[mode]["deltas"])
        assert got["batches"] == GLOBAL_BATCHES and got["samples"] == oracle[mode]["samples"]
        assert got["world_size"] == 2
        if mode in ("dense", "weight"):  # and the exact init of the autograd gradient
            _assert_same_adapter(got["deltas"], oracle["exact"], tol=1e-4)
        assert got["modes"] == [mode.rstrip("2")], got["modes"]  # a sketch case ran sketches, not the dense fallback
    _assert_ranks_identical(two_ranks, case)


def test_bytes_reported(two_ranks):
    """Dense: each G goes to its owner once (reduce), so the two ranks together send one copy of every G (plus the
    factors and the small agreement vectors); sketch: all-reduced sketches, the same on both ranks."""
    layers = lora_layers(_model()).values()
    g_bytes = sum(4 * layer.out_features * layer.in_features for layer in layers)
    factor_bytes = sum(4 * LORA["r"] * (layer.out_features + layer.in_features) for layer in layers)
    dense = [r["dense"] for r in two_ranks]
    sent = sum(d["sent"] for d in dense)
    # on top: the engine's numbers of each module (pickled, a few hundred bytes) and the agreement vectors
    assert g_bytes + factor_bytes < sent <= g_bytes + factor_bytes + 1000 * len(layers), (sent, g_bytes, factor_bytes)
    assert sum(d["received"] for d in dense) == sent
    # ownership is balanced: neither rank sends much more than half
    assert max(d["sent"] for d in dense) <= 0.75 * sent
    sketch = [r["sketch"] for r in two_ranks]
    assert sketch[0]["sent"] == sketch[1]["sent"] == sketch[0]["received"] > 0
    assert "rank 0 sent" in sketch[0]["table"] and "2 ranks" in sketch[0]["table"]


@pytest.mark.parametrize("case", ["fail", "fsdp_fail"])
def test_failing_rank_makes_every_rank_raise(two_ranks, oracle, case):
    """Unsharded: one agreement after the batches; FSDP (whose forward is itself a collective): one per batch."""
    for results in two_ranks:
        got = results[case]
        assert got["error"] == "DistributedInitError", got
        assert "rank 1 of 2" in got["message"] and FAIL_MESSAGE in got["message"] and "ValueError" in got["message"]
        assert got["seconds"] < 30  # not the 60 s timeout: the agreement step told every rank
    # the process group still works after the failure, and the next call gives the right adapter
    _assert_same_adapter(two_ranks[0]["dense"]["deltas"], oracle["dense"]["deltas"])
    _assert_ranks_identical(two_ranks, "dense")


def test_world_sizes_1_2_3_agree(two_ranks, three_ranks, oracle):
    for case in ("dense", "sketch"):
        for results in three_ranks:
            got = results[case]
            assert "error" not in got, got
            assert got["batches"] == GLOBAL_BATCHES and got["world_size"] == 3
            _assert_same_adapter(got["deltas"], oracle[case]["deltas"])
            _assert_same_adapter(got["deltas"], two_ranks[0][case]["deltas"])
        _assert_ranks_identical(three_ranks, case)


def test_agreement_timeout_names_the_problem(two_ranks):
    got = two_ranks[0]["timeout"]
    assert got["error"] == "DistributedInitError", got
    assert "did not complete within 3 s" in got["message"] and "LoraOneConfig.dist_timeout" in got["message"]
    assert got["seconds"] < 20


# ---------------------------------------------------------------------------------------------------------
# no launch
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "sizes, world, expect",
    [
        ([10, 10, 10, 10], 2, [0, 1, 0, 1]),
        ([1, 100, 50, 50], 2, [0, 0, 1, 1]),  # largest first: 100 -> 0, 50 -> 1, 50 -> 1, then 1 -> 0
        ([5, 4, 3, 3, 3], 3, [0, 1, 2, 2, 1]),
        ([7], 4, [0]),
    ],
)
def test_assign_owners_balances_by_size(sizes, world, expect):
    owners = assign_owners(sizes, world)
    assert owners == expect
    loads = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(world)]
    assert max(loads) - min(loads) <= max(sizes)


def test_traffic_volumes():
    t = Traffic()
    t.all_reduce(400, 4)  # ring: 2 (P-1)/P N each way
    assert (t.sent, t.received) == (600, 600)
    owner, other = Traffic(), Traffic()
    owner.reduce(100, 3, dst=1, rank=1)
    other.reduce(100, 3, dst=1, rank=0)
    assert (owner.received, other.sent) == (200, 100)
    src, dst = Traffic(), Traffic()
    src.broadcast(10, 3, src=2, rank=2)
    dst.broadcast(10, 3, src=2, rank=0)
    assert (src.sent, dst.received) == (20, 10)


def test_single_process_is_unchanged_and_local_only():
    """Without a process group (or inside local_only) initialize reports one rank and no traffic."""
    from peft_loraone._distributed import Session, local_only

    assert Session.current() is None
    with local_only():
        assert Session.current() is None



def test_example_script_single_process():
    """examples/distributed_init.py without a launcher: one process, the same adapter as plain initialize."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "examples" / "distributed_init.py"
    spec = importlib.util.spec_from_file_location("distributed_init_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--check"]) <= 1e-6
    with pytest.raises(SystemExit):
        example.main(["--wrap", "ddp"])  # needs a launcher
