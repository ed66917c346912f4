r"""LoRA-One initialization across the processes of ``torch.distributed`` (``torchrun``, ``accelerate launch``).

When a process group is initialized with more than one rank, :func:`peft_loraone.initialize` called on every rank
treats each rank's batches as its share of the global data:

    G = (1/N) sum over all ranks r, over rank r's batches b of  dL(b)/dW0,     N = sum_r N_r

so the adapter is the single-process adapter of the union of the batches, and every rank ends with the same one.
What travels depends on the capture mode:

``"sketch"``
    The sketches (Y = G·Omega, Z = G·Omega_t and W = Psi·G, or X = Qᵀ·G in the second pass) are linear in G and the
    test matrices are drawn from the same seed and module name on every rank, so the sum over ranks of each rank's
    sketch is exactly the sketch of the global G. They are all-reduced (a few MB per module), and every rank
    reconstructs the factors from the same reduced sketches (the engine is deterministic: ranks agree bit for bit).
``"dense"`` and ``"weight"``
    G is not all-reduced to every rank: each target is owned by one rank (targets assigned by size, largest first,
    to the least loaded rank), its G is reduced to the owner only, the owner runs the engine on it, and the factors
    (``lora_B``, ``lora_A`` and the engine's numbers) are broadcast from the owner. That moves about half the bytes
    of an all-reduce of every G and spreads the SVDs over the ranks. DoRA magnitudes are then computed by every rank
    from the same factors and its own copy of W0.

Failure agreement: before its first collective each call runs an *agreement step*, one all-reduce of a small
integer vector (a failure flag, the rank's batch and sample counts, and which targets received a gradient). A rank
whose batches raised takes part in it with its flag set, so every rank learns of the failure at the same point,
gathers the failing ranks' exception messages and raises :class:`DistributedInitError` naming them, instead of
waiting forever in a collective the failing rank never reaches. The agreement waits at most
``LoraOneConfig.dist_timeout`` seconds (else the ``PEFT_LORAONE_DIST_TIMEOUT`` environment variable; else the process group's own timeout, 30 minutes
for gloo, 10 for NCCL in PyTorch 2.x) for the other ranks, then raises :class:`DistributedInitError` too.

Bytes: :class:`Traffic` counts what each rank sent and received, by the textbook volume of each collective (what
the report shows as ``sent_bytes``/``received_bytes``): ring all-reduce of N bytes: 2(P-1)/P·N sent and received
per rank; reduce of N bytes to one rank: N sent by every other rank, (P-1)·N received by the owner (on gloo the
reduce is done so, with point-to-point sends: gloo's own ``reduce`` moved 2.46·N over loopback for 2 ranks, more than
its all-reduce's 2·N); broadcast of N bytes: (P-1)·N sent by the source, N received by every other rank. The
backend's own framing is not counted.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import pickle
import time
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

from .errors import LoraOneError

logger = logging.getLogger(__name__)

__all__ = ["DistributedInitError", "Session", "Traffic", "assign_owners", "local_only", "unwrap"]

#: Environment variable: seconds the agreement step waits for the other ranks.
TIMEOUT_ENV = "PEFT_LORAONE_DIST_TIMEOUT"

_LOCAL: contextvars.ContextVar[bool] = contextvars.ContextVar("peft_loraone_local_only", default=False)


class DistributedInitError(LoraOneError, RuntimeError):
    """LoRA-One initialization failed on one or more ranks of ``torch.distributed`` (or a rank did not reach the
    agreement step in time); raised on every rank.

    Attributes:
        failures: ``{rank: "ExceptionType: message"}`` of the ranks that raised (empty after a timeout).
    """

    def __init__(self, message: str, failures: Optional[dict[int, str]] = None) -> None:
        super().__init__(message)
        self.failures = dict(failures or {})


@contextlib.contextmanager
def local_only() -> Iterator[None]:
    """Inside this context :func:`peft_loraone.initialize` ignores ``torch.distributed``: each rank computes G from
    its own batches alone (no collective runs)."""
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel`` (and ``DataParallel``) wrappers.

    The gradient pass then runs on the inner module: DDP's own forward would prepare its gradient reducer for a
    backward that, with every parameter frozen during the pass, never produces a gradient for it."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while isinstance(model, (DistributedDataParallel, DataParallel)):
        model = model.module
    return model


def assign_owners(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each item: largest first to the least loaded rank (ties: the lower rank, then the earlier item),
    the greedy balance of the sizes (``sizes[i]``: elements of G). Deterministic, so every rank computes the same."""
    load = [0] * world
    owners = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        rank = min(range(world), key=lambda r: (load[r], r))
        owners[i] = rank
        load[rank] += sizes[i]
    return owners


def _dtensor_type() -> Any:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without DTensor
        return ()
    return DTensor


def full(x: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded ``DTensor`` (FSDP2's parameters; a collective: every rank calls it in the same
    order), else ``x``."""
    return x.full_tensor() if isinstance(x, _dtensor_type()) else x


def like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` (the whole tensor, the same on every rank) laid out as ``param``: this rank's shard of it as a
    ``DTensor`` with ``param``'s mesh and placements when ``param`` is one (no communication), else ``value``."""
    if isinstance(param, _dtensor_type()) and not isinstance(value, _dtensor_type()):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(value.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    return value


@dataclass
class Traffic:
    """Bytes this rank sent and received in collectives (textbook volumes, see the module docstring)."""

    sent: int = 0
    received: int = 0

    def all_reduce(self, nbytes: int, world: int) -> None:
        moved = 2 * (world - 1) * nbytes // world
        self.sent += moved
        self.received += moved

    def reduce(self, nbytes: int, world: int, dst: int, rank: int) -> None:
        if rank == dst:
            self.received += (world - 1) * nbytes
        else:
            self.sent += nbytes

    def broadcast(self, nbytes: int, world: int, src: int, rank: int) -> None:
        if rank == src:
            self.sent += (world - 1) * nbytes
        else:
            self.received += nbytes


def _timeout_from_env() -> Optional[datetime.timedelta]:
    value = os.environ.get(TIMEOUT_ENV)
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {value!r}.") from None
    if seconds <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be positive, got {value!r}.")
    return datetime.timedelta(seconds=seconds)


def _describe(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 2000 else text[:2000] + " ..."


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class _Received:
    """A finished engine job whose factors came from their owner rank (the interface of ``Job``)."""

    def __init__(self, factors: Any = None, error: Optional[BaseException] = None) -> None:
        self._factors, self._error = factors, error

    def result(self, timeout: Optional[float] = None) -> Any:
        if self._error is not None:
            raise self._error
        return self._factors

    def done(self) -> bool:
        return True

    def cancel(self) -> bool:
        return False


def _sharded(model: nn.Module) -> bool:
    """Whether FSDP (FSDP2's ``fully_shard`` or the older ``FullyShardedDataParallel``) wraps part of ``model``."""
    kinds: list[type] = []
    try:
        from torch.distributed.fsdp import FSDPModule

        kinds.append(FSDPModule)
    except ImportError:
        pass
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel

        kinds.append(FullyShardedDataParallel)
    except ImportError:
        pass
    return bool(kinds) and any(isinstance(m, tuple(kinds)) for m in model.modules())


def check_supported(session: Optional[Session], model: nn.Module, capture: str) -> None:
    """Refuse what cannot run across ranks: ``capture="weight"`` on a sharded model (its ``W.grad`` is a shard)."""
    if session is not None and capture == "weight" and _sharded(model):
        raise ValueError(
            "peft_loraone.initialize: capture='weight' reads each target weight's .grad, which FSDP shards across the "
            "ranks; use capture='dense' or 'sketch' (the default 'dense' takes G from the layers' activations and "
            "needs neither whole weights nor W.grad)."
        )


def guard(session: Optional[Session], capture: Any) -> contextlib.AbstractContextManager:
    """:meth:`Session.guard`, or nothing outside ``torch.distributed``."""
    return contextlib.nullcontext() if session is None else session.guard(capture)


class Session:
    """One :func:`peft_loraone.initialize` call's view of the process group (the default group).

    Attributes:
        rank, world: This rank and the world size.
        traffic: The bytes this rank sent and received.
        batches, samples: The global batch and sample counts, known after the first agreement step.
    """

    def __init__(self, timeout: Optional[float] = None) -> None:
        import torch.distributed as dist

        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.traffic = Traffic()
        self.timeout = datetime.timedelta(seconds=timeout) if timeout is not None else _timeout_from_env()
        self.batches = 0
        self.samples: Optional[int] = None
        self._device = torch.device("cpu")
        self._collective_failed = False
        backend = dist.get_backend()
        if backend == "nccl" and torch.cuda.is_available():
            self._device = torch.device("cuda", torch.cuda.current_device())

    @staticmethod
    def current(timeout: Optional[float] = None) -> Optional[Session]:
        """A session when ``torch.distributed`` is initialized with more than one rank (and not inside
        :func:`local_only`), else None."""
        import torch.distributed as dist

        if _LOCAL.get() or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return Session(timeout)

    def report_fields(self) -> dict[str, int]:
        """The :class:`~peft_loraone.InitReport` fields of a distributed run."""
        return {
            "world_size": self.world,
            "rank": self.rank,
            "sent_bytes": self.traffic.sent,
            "received_bytes": self.traffic.received,
        }

    # -- agreement ------------------------------------------------------------------------------------------

    def _wait(self, work: Any, what: str) -> None:
        try:
            if self.timeout is None:
                work.wait()
            else:
                work.wait(timeout=self.timeout)
        except Exception as exc:
            self._collective_failed = True
            limit = "the process group's timeout"
            if self.timeout is not None:
                limit = f"{self.timeout.total_seconds():g} s (LoraOneConfig.dist_timeout or {TIMEOUT_ENV})"
            raise DistributedInitError(
                f"peft_loraone.initialize on rank {self.rank} of {self.world}: {what} did not complete within {limit}: "
                "another rank did not reach it (it crashed, hangs, or does not call initialize with the same model "
                f"and config). {_describe(exc)}"
            ) from exc

    def agree(
        self,
        capture: Any,
        *,
        samples: Optional[int] = None,
        error: Optional[BaseException] = None,
        stage: str = "gradient pass",
    ) -> list[bool]:
        """The agreement step: one all-reduce of [failed, batches, samples, samples unknown, has_data per
        accumulator]. Raises :class:`DistributedInitError` on every rank if any rank failed; else records the
        global counts and returns, per accumulator of ``capture``, whether any rank has data for it."""
        import torch.distributed as dist

        accs = capture.accumulators
        vec = torch.zeros(4 + len(accs), dtype=torch.int64)
        if error is not None:
            vec[0] = 1
        else:
            vec[1] = capture.batches
            vec[2] = samples or 0
            vec[3] = int(samples is None)
            vec[4:] = torch.tensor([int(acc.has_data) for acc in accs], dtype=torch.int64)
        dev = vec.to(self._device)
        self.traffic.all_reduce(_nbytes(dev), self.world)
        self._wait(dist.all_reduce(dev, op=dist.ReduceOp.SUM, async_op=True), f"LoRA-One's agreement after the {stage}")
        vec = dev.cpu()
        if int(vec[0]) > 0:
            self._raise_failures(error, stage)
        self.batches = int(vec[1])
        self.samples = None if int(vec[3]) else int(vec[2])
        return [bool(v) for v in vec[4:].tolist()]

    def _raise_failures(self, error: Optional[BaseException], stage: str) -> None:
        """After an agreement said some rank failed: gather the failing ranks' messages and raise on every rank."""
        import torch.distributed as dist

        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, None if error is None else (self.rank, _describe(error)))
        failures = {r: msg for r, msg in (g for g in gathered if g is not None)}
        ranks = ", ".join(str(r) for r in sorted(failures))
        detail = "; ".join(f"rank {r}: {msg}" for r, msg in sorted(failures.items()))
        exc = DistributedInitError(
            f"peft_loraone.initialize failed during the {stage} on rank{'s' if len(failures) > 1 else ''} {ranks} "
            f"of {self.world} (every rank stops here): {detail}",
            failures,
        )
        raise exc from error

    @contextlib.contextmanager
    def guard(self, capture: Any) -> Iterator[None]:
        """Around the gradient pass: an exception raised on this rank is announced to the others through the
        agreement step, and every rank raises :class:`DistributedInitError`."""
        try:
            yield
        except DistributedInitError:
            raise
        except Exception as exc:
            if self._collective_failed:
                raise
            try:
                self.agree(capture, error=exc)
            except DistributedInitError as agreed:
                raise agreed from exc
            raise  # unreachable: agree raises when this rank failed

    def begin_pass(self, capture: Any, samples: Optional[int]) -> None:
        """``GradientCapture.begin_pass`` across the ranks (two-pass sketch): agree, then each accumulator all-reduces
        its pass-1 sketches (Y and Z) before orthonormalizing Y, so every rank replays with the same Q."""
        self.agree(capture, samples=samples, stage="first sketch pass")
        capture.begin_pass()
        for acc in capture.accumulators:
            merged = [s for s in (getattr(acc, "Y", None), getattr(acc, "Z", None)) if s is not None]
            self.traffic.all_reduce(sum(_nbytes(s) for s in merged), self.world)

    def each_batch(self, model: nn.Module, batches: Iterator[Any]) -> Iterator[Any]:
        """``batches``, in lockstep over the ranks when the model is sharded (FSDP): FSDP's forward runs collectives
        (parameter all-gathers), so a rank whose data raised, or ran out, would leave the others waiting in one.
        Before each batch every rank all-reduces [failed, exhausted]; a failure raises
        :class:`DistributedInitError` on every rank, and different batch counts are refused. Unsharded models
        (plain or DDP-wrapped: no collective in forward) are iterated as they are."""
        import torch.distributed as dist

        if not _sharded(model):
            yield from batches
            return
        it = iter(batches)
        while True:
            error: Optional[BaseException] = None
            item: Any = None
            exhausted = 0
            try:
                item = next(it)
            except StopIteration:
                exhausted = 1
            except Exception as exc:  # noqa: BLE001 - announced to every rank below
                error = exc
            vec = torch.tensor([int(error is not None), exhausted], dtype=torch.int64, device=self._device)
            self.traffic.all_reduce(_nbytes(vec), self.world)
            work = dist.all_reduce(vec, op=dist.ReduceOp.SUM, async_op=True)
            self._wait(work, "LoRA-One's per-batch agreement (FSDP)")
            failed, done = (int(v) for v in vec.tolist())
            if failed:
                self._raise_failures(error, "gradient pass")
            if done == self.world:
                return
            if done:
                self._collective_failed = True
                raise DistributedInitError(
                    f"peft_loraone.initialize on rank {self.rank}: with a sharded (FSDP) model every rank must bring "
                    f"the same number of batches (FSDP's forward is a collective), but {done} of {self.world} ranks "
                    "ran out first. Give every rank the same number of batches (e.g. a DistributedSampler with "
                    "drop_last=True) or pass num_batches no larger than the smallest shard."
                )
            yield item

    # -- reduction and decomposition ------------------------------------------------------------------------

    def finish(self, capture: Any, samples: Optional[int]) -> list[Any]:
        """``GradientCapture.finish`` across the ranks: agree, reduce, decompose, share. Every target ends with a
        finished job (its factors, identical on every rank); returns the targets no rank had a gradient for.
        ``samples``: this rank's sample count (None: unknown)."""
        has_data = self.agree(capture, samples=samples)
        engine, gamma, svd = capture._engine, capture.gamma, capture.svd
        accs = capture.accumulators
        missing = [t for acc, has in zip(accs, has_data) if not has for t in acc.targets]
        live = [acc for acc, has in zip(accs, has_data) if has]
        if capture.mode == "sketch":
            for acc in live:
                acc.merge()
                self.traffic.all_reduce(sum(_nbytes(s) for s in acc._state()), self.world)
                acc.submit(engine, self.batches, gamma, svd)
            return missing
        owners = assign_owners([acc.shape[0] * acc.shape[1] for acc in live], self.world)
        for acc, owner in zip(live, owners):
            if acc.stager is not None:
                acc.stager.flush()
            nbytes = acc.shape[0] * acc.shape[1] * torch.empty((), dtype=acc.dtype).element_size()
            acc.merge(dst=owner)
            self.traffic.reduce(nbytes, self.world, owner, self.rank)
            if owner == self.rank:
                try:
                    acc.submit(engine, self.batches, gamma, svd)
                except Exception as exc:  # reported through the broadcast below, so no rank is left waiting
                    for t in acc.targets:
                        t.job = _Received(error=exc)
        self._share(live, owners)
        return missing

    def _share(self, live: list[Any], owners: list[int]) -> None:
        """Broadcast each owner's factors: first the engine's numbers (and errors) as a pickled list, then B and A
        of its targets as one flat buffer per dtype."""
        import torch.distributed as dist

        from .errors import ZeroGradientError

        errors: list[str] = []
        for src in range(self.world):
            targets = [t for acc, owner in zip(live, owners) if owner == src for t in acc.targets]
            if not targets:
                continue
            meta: list[Any] = [None]
            if src == self.rank:
                entries = []
                for t in targets:
                    try:
                        f = t.job.result()
                    except ZeroGradientError as exc:
                        entries.append(("zero", str(exc)))
                    except Exception as exc:
                        entries.append(("error", _describe(exc)))
                    else:
                        entries.append(("ok", _strip(f)))
                meta = [entries]
            size = len(pickle.dumps(meta[0])) if src == self.rank else 0
            dist.broadcast_object_list(meta, src=src, device=self._device if self._device.type != "cpu" else None)
            if src != self.rank:
                size = len(pickle.dumps(meta[0]))
            self.traffic.broadcast(size, self.world, src, self.rank)
            entries = meta[0]
            ok = [(t, e[1]) for t, e in zip(targets, entries) if e[0] == "ok"]
            for dtype in sorted({t.out_dtype for t, _ in ok}, key=str):
                group = [t for t, _ in ok if t.out_dtype == dtype]
                m_n = [(t.shape, t.rank) for t in group]
                total = sum(k * (m + n) for (m, n), k in m_n)
                if src == self.rank:
                    flat = torch.cat([torch.cat([t.out_b.reshape(-1), t.out_a.reshape(-1)]) for t in group])
                else:
                    flat = torch.empty(total, dtype=dtype)
                dev = flat.to(self._device)
                dist.broadcast(dev, src=src)
                self.traffic.broadcast(_nbytes(dev), self.world, src, self.rank)
                if src != self.rank:
                    flat, offset = dev.cpu(), 0
                    for t, ((m, n), k) in zip(group, m_n):
                        t.out_b = flat[offset : offset + m * k].view(m, k)
                        offset += m * k
                        t.out_a = flat[offset : offset + k * n].view(k, n)
                        offset += k * n
            now = time.perf_counter()
            for t, entry in zip(targets, entries):
                status, value = entry
                if src != self.rank:
                    t.submitted_at = now
                if status == "ok":
                    t.job = _Received(_with_factors(value, t.out_b, t.out_a))
                elif status == "zero":
                    t.job = _Received(error=ZeroGradientError(value))
                else:
                    t.job = _Received(error=RuntimeError(value))
                    errors.append(f"{t.name!r} (on rank {src}): {value}")
        if errors:
            raise DistributedInitError(
                f"peft_loraone.initialize: the LoRA-One factors could not be computed for {'; '.join(errors)}",
                {},
            )


def _strip(factors: Any) -> Any:
    """The engine's result without its big tensors (B and A travel separately)."""
    import dataclasses

    if dataclasses.is_dataclass(factors):
        return dataclasses.replace(factors, B=None, A=None)
    return factors


def _with_factors(factors: Any, b: torch.Tensor, a: torch.Tensor) -> Any:
    import dataclasses

    if dataclasses.is_dataclass(factors):
        return dataclasses.replace(factors, B=b, A=a)
    return factors
