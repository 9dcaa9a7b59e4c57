"""Several processes, one job: data-parallel training and sharded segmentation under ``torchrun``.

PyTorch's own machinery, as MONAI bundles and nnU-Net use it: ``torchrun`` starts one process per GPU (or per CPU
share) and tells each who it is through environment variables (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``); :func:`setup` reads them, joins the process group (NCCL on
CUDA, gloo on CPU) and checks that every rank runs the same software. Without those variables, or with
``WORLD_SIZE=1``, nothing here does anything: :data:`SINGLE` is the one-process context and the jobs run exactly as
they always did (no process group, no DDP wrapper).

Who does what (see ``docs/scale.md``):

* every rank trains on its slice of each step's global batch (:meth:`Distributed.shard`), gradients averaged by
  ``DistributedDataParallel``;
* rank 0 alone validates and writes: checkpoints, ``best/``, ``last/``, the final adapter, history, events, the run
  lock. The other ranks write nothing, so nothing is written twice or by two processes at once;
* every check before the work runs inside :meth:`Distributed.agreement`: a mistake found by any rank (or only by
  rank 0, which alone validates the data) stops every rank, with one line printed, instead of leaving the others
  waiting in a collective until its timeout.

Timeouts (seconds, from the environment; a launcher sets them, a user rarely needs to): ``TENSORPEFT_JOIN_TIMEOUT``
(default 300) for reaching the rendezvous, so a rank that cannot reach ``MASTER_ADDR:MASTER_PORT`` stops with one
line instead of hanging; ``TENSORPEFT_DIST_TIMEOUT`` (default 1800, the time another rank may wait for rank 0's
validation) for each collective during training; sharded ``segment`` waits up to a day in its final gather,
since ranks finish their shares at different times.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence, TypeVar

import torch

from .runtime import EngineError

T = TypeVar("T")

JOIN_TIMEOUT_ENV = "TENSORPEFT_JOIN_TIMEOUT"
TIMEOUT_ENV = "TENSORPEFT_DIST_TIMEOUT"
DEFAULT_JOIN_TIMEOUT = 300.0
DEFAULT_TIMEOUT = 1800.0
#: sharded segment: the final gather waits for the slowest rank's share (a day is far beyond any folder we know)
SEGMENT_TIMEOUT = 86400.0


class PeerError(EngineError):
    """Raised on the ranks that agree to stop because another rank (named in the message) failed. The CLI prints
    nothing for it: the failing rank prints the one line, so a 16-rank job does not print it 16 times."""


@dataclass(frozen=True)
class Distributed:
    """Who this process is in a ``torchrun`` job (``world_size`` 1: a plain one-process job)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> dict[str, Any]:
        return {"rank": self.rank, "world_size": self.world_size, "backend": self.backend}

    # ------------------------------------------------------------------------------------------ sharding
    def shard(self, items: Sequence[T]) -> list[T]:
        """This rank's share of ``items``: every ``world_size``-th one from position ``rank`` (ranks beyond the
        number of items get none). Depends on nothing but the list, so no rank has to ask another."""
        return list(items[self.rank::self.world_size])

    # ------------------------------------------------------------------------------------------ collectives
    def barrier(self) -> None:
        if self.active:
            _run_collective(lambda: torch.distributed.barrier(**_device_ids(self)))

    def gather(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), in rank order, on every rank."""
        if not self.active:
            return [value]
        values: list[Any] = [None] * self.world_size
        _run_collective(lambda: torch.distributed.all_gather_object(values, value))
        return values

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank."""
        if not self.active:
            return value
        box = [value if self.is_main else None]
        _run_collective(lambda: torch.distributed.broadcast_object_list(box, src=0))
        return box[0]

    def mean_and_any(self, value: float, flag: bool, device: torch.device) -> tuple[float, bool]:
        """The mean of ``value`` over the ranks and whether any rank's ``flag`` is set, in one all-reduce (the
        training loop's per-step exchange: the global batch's loss, and "stop" once any rank was asked to)."""
        if not self.active:
            return value, flag
        both = torch.tensor([float(value), 1.0 if flag else 0.0], dtype=torch.float64, device=device)
        _run_collective(lambda: torch.distributed.all_reduce(both))
        return float(both[0]) / self.world_size, bool(both[1] > 0)

    @contextlib.contextmanager
    def agreement(self) -> Iterator[None]:
        """Run a block on every rank, then agree on its outcome: if any rank raised, every rank stops. The lowest
        failing rank re-raises its own error (the CLI prints it, prefixed ``[rank N]`` when N > 0); every other rank
        raises :class:`PeerError` (printed by no one). One process: the block as it is."""
        if not self.active:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as err:  # noqa: BLE001 - every rank must reach the exchange below, whatever went wrong
            error = err
        outcomes = self.gather(None if error is None else f"{error}")
        failed = [rank for rank, message in enumerate(outcomes) if message is not None]
        if not failed:
            return
        if error is not None and failed[0] == self.rank:
            raise error
        raise PeerError(f"rank {failed[0]} stopped the job: {outcomes[failed[0]]}") from None


#: the one-process context: what every job uses unless torchrun started it
SINGLE = Distributed()
_current: Distributed = SINGLE
_owned = False  # whether setup() created the process group (and shutdown() should destroy it)


def current() -> Distributed:
    """The context :func:`setup` established (:data:`SINGLE` before that, or without torchrun)."""
    return _current


def rank_prefix() -> str:
    """``"[rank N] "`` for a message printed by rank N > 0 of a multi-process job, else empty."""
    return f"[rank {_current.rank}] " if _current.active and not _current.is_main else ""


def _env_int(name: str, default: int | None = None) -> int:
    text = os.environ.get(name)
    if text is None or text == "":
        if default is None:
            raise EngineError(f"{name} is not set; start multi-process jobs with torchrun (see docs/scale.md)")
        return default
    try:
        return int(text)
    except ValueError:
        raise EngineError(f"environment variable {name}={text!r} is not a whole number (set by torchrun)") from None


def from_environment() -> Distributed:
    """Read torchrun's variables. ``WORLD_SIZE`` unset or 1: :data:`SINGLE`."""
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return SINGLE
    rank = _env_int("RANK")
    local_rank = _env_int("LOCAL_RANK", rank)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    if not 0 <= rank < world or not 0 <= local_rank < local_world:
        raise EngineError(f"RANK={rank} / LOCAL_RANK={local_rank} do not fit WORLD_SIZE={world} / "
                          f"LOCAL_WORLD_SIZE={local_world}; start the job with torchrun")
    return Distributed(rank, world, local_rank, local_world)


def _timeout(name: str, default: float) -> datetime.timedelta:
    text = os.environ.get(name)
    try:
        seconds = float(text) if text else default
    except ValueError:
        raise EngineError(f"{name}={text!r}: give a number of seconds") from None
    if not seconds > 0:
        raise EngineError(f"{name}={text!r}: must be > 0 seconds")
    return datetime.timedelta(seconds=seconds)


def wants_cuda(device: str) -> bool:
    device = (device or "auto").lower()
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def setup(device: str = "auto", *, collective_timeout: float | None = None, backend: str | None = None) -> Distributed:
    """Join the process group torchrun describes, once per process; later calls return the same context.

    The backend is NCCL when the job runs on CUDA GPUs (each rank on GPU ``LOCAL_RANK``) and gloo otherwise
    (``backend`` overrides: sharded segmentation exchanges only a few Python objects and always uses gloo). Joining
    waits at most ``TENSORPEFT_JOIN_TIMEOUT`` seconds; then every rank's software versions are compared
    (:func:`software_version`) and a mismatch is refused. Outside torchrun: :data:`SINGLE`, nothing initialised.
    """
    global _current, _owned
    import torch.distributed as dist

    if _current.active:
        return _current
    wanted = from_environment()
    if not wanted.active:
        return SINGLE
    if not dist.is_available():
        raise EngineError("this torch build has no torch.distributed; run one process, or install a standard build")
    cuda = wants_cuda(device)
    if cuda and (device or "auto").lower().startswith("cuda:"):
        raise EngineError(f"--device {device}: under torchrun every rank uses the GPU of its LOCAL_RANK; give "
                          "--device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")
    if (device or "").lower() == "mps":
        raise EngineError("--device mps: Apple MPS cannot join a multi-process job; use --device cpu")
    if cuda:
        if not torch.cuda.is_available():
            raise EngineError(f"--device {device}: no CUDA GPU is visible to this torch build ({torch.__version__})")
        if wanted.local_rank >= torch.cuda.device_count():
            raise EngineError(f"LOCAL_RANK {wanted.local_rank}, but only {torch.cuda.device_count()} GPU(s) are "
                              "visible on this node: lower --nproc_per_node")
        torch.cuda.set_device(wanted.local_rank)  # before the group exists, so NCCL binds each rank to its own GPU
    backend = backend or ("nccl" if cuda else "gloo")
    if backend == "nccl" and not dist.is_nccl_available():
        raise EngineError("this torch build has no NCCL; use --device cpu for a gloo job")
    timeout = _timeout(TIMEOUT_ENV, collective_timeout or DEFAULT_TIMEOUT)  # the environment's value wins
    if dist.is_initialized():  # the caller's own group (a program that set it up itself): use it as it is
        _current = Distributed(dist.get_rank(), dist.get_world_size(), wanted.local_rank, wanted.local_world_size,
                               dist.get_backend())
        return _current
    _join(wanted, backend, timeout)
    _owned = True
    _current = Distributed(wanted.rank, wanted.world_size, wanted.local_rank, wanted.local_world_size, backend)
    try:
        check_same_software(_current, software_version())
    except EngineError:
        shutdown()
        raise
    return _current


def _join(who: Distributed, backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` in two steps, so that reaching the rendezvous has its own (short) timeout while the
    collectives get ``timeout``: torch's env:// rendezvous (what ``init_process_group`` does itself, including
    torchrun's agent store), then the group on that store."""
    import torch.distributed as dist

    join = _timeout(JOIN_TIMEOUT_ENV, DEFAULT_JOIN_TIMEOUT)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    if "MASTER_ADDR" not in os.environ or "MASTER_PORT" not in os.environ:
        raise EngineError(f"WORLD_SIZE={who.world_size} is set but MASTER_ADDR/MASTER_PORT are not: start "
                          "multi-process jobs with torchrun (see docs/scale.md)")
    try:
        with _native_stderr_kept_on_success():
            store, _, _ = next(dist.rendezvous("env://", who.rank, who.world_size, timeout=join))
            store.set_timeout(timeout)
            dist.init_process_group(backend, store=dist.PrefixStore("default_pg", store), rank=who.rank,
                                    world_size=who.world_size, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - store, socket and backend errors all mean "could not join"
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise EngineError(f"rank {who.rank} of {who.world_size} could not join the job at {where} within "
                          f"{join.total_seconds():g} s ({type(err).__name__}: {first[:200]}); check that every node "
                          "can reach that address (torchrun --rdzv-endpoint / --master-addr) and that all ranks "
                          "were started") from None


@contextlib.contextmanager
def _native_stderr_kept_on_success() -> Iterator[None]:
    """Hold what C++ code writes to file descriptor 2 during the block; pass it on if the block succeeds, drop it if
    it fails. c10d logs a failed connection to the rendezvous with a 40-line native stack trace before raising, which
    would bury the one line that says what to do (the exception keeps the cause)."""
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        succeeded = False
        try:
            yield
            succeeded = True
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            if succeeded:
                sink.seek(0)
                held = sink.read()
                if held:
                    os.write(2, held)


def shutdown() -> None:
    """Leave the process group :func:`setup` created (the CLI calls this when a command ends)."""
    global _current, _owned
    import torch.distributed as dist

    if _owned and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - leaving must never hide the command's own outcome
            pass
    _owned = False
    _current = SINGLE


def software_version() -> str:
    """What must be the same on every rank: our version and a fingerprint of our source files (two checkouts with
    one version number differ here), torch (with its CUDA build), MONAI and Python."""
    import platform

    import monai

    from .. import __version__

    root = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode())
        digest.update(path.read_bytes())
    return (f"tensorpeft {__version__} (source {digest.hexdigest()[:12]}), torch {torch.__version__}, "
            f"monai {monai.__version__}, python {platform.python_version()}")


def check_same_software(ctx: Distributed, mine: str) -> None:
    """Refuse a job whose ranks run different software (a node with another torch or an older checkout would
    train on silently, or fail later in a way that names nothing): all ranks exchange ``mine`` and compare."""
    versions = ctx.gather(mine)
    if len(set(versions)) == 1:
        return
    groups: dict[str, list[int]] = {}
    for rank, version in enumerate(versions):
        groups.setdefault(version, []).append(rank)
    text = "; ".join(f"rank{'s' if len(r) > 1 else ''} {','.join(map(str, r))}: {v}" for v, r in groups.items())
    message = f"the ranks run different software ({text}); install the same versions on every node"
    raise (EngineError if ctx.is_main else PeerError)(message)


def _device_ids(ctx: Distributed) -> dict[str, Any]:
    """NCCL's barrier wants to know the GPU (it warns and guesses otherwise)."""
    return {"device_ids": [ctx.local_rank]} if ctx.backend == "nccl" else {}


def is_lost_peer(err: BaseException) -> bool:
    """A collective that failed because another rank died or stopped answering (gloo: "Connection closed by
    peer"; NCCL: the watchdog's timeout), as opposed to a bug in this rank."""
    import torch.distributed as dist

    if isinstance(err, LostPeer) or isinstance(err, getattr(dist, "DistError", ())):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(k in text for k in (
        "connection closed by peer", "connection reset", "broken pipe", "timed out", "timeout", "gloo", "nccl",
        "socket", "peer"))


def _run_collective(call: Any) -> Any:
    try:
        return call()
    except Exception as err:  # noqa: BLE001 - only a lost peer is translated
        if is_lost_peer(err):
            raise LostPeer(str(err)) from None
        raise


class LostPeer(EngineError):
    """A collective failed: another rank stopped (killed, crashed, or its node went away)."""


def unused_parameters(model: torch.nn.Module, loss: torch.Tensor) -> list[str]:
    """The trainable parameters of ``model`` that ``loss``'s autograd graph does not reach (walked from its
    ``grad_fn`` to the leaves; no backward pass)."""
    reached: set[int] = set()
    seen: set[Any] = set()
    stack = [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # an AccumulateGrad node: its leaf
        if variable is not None:
            reached.add(id(variable))
        stack.extend(next_node for next_node, _ in node.next_functions)
    return [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in reached]


def data_parallel(model: torch.nn.Module, device: torch.device, *, init_sync: bool = True,
                  find_unused: bool = False) -> torch.nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` for the training step (evaluation, saving and SeLoRA's
    Fisher test keep using ``model`` itself).

    * ``find_unused_parameters`` only where needed (``find_unused``, from :func:`unused_parameters` on the first
      batch): the adapters' trainable tensors all take part in each forward pass (the shared factors of LoRA-PT /
      tCURLoRA / LoTR too: they are parameters of ``model.tensorpeft_groups``, used through every member layer's
      slice; ``Testing/test_distributed.py`` checks every method), and searching for unused ones costs a graph
      traversal every step. ``full`` fine-tuning of a UNETR is the exception: MONAI's transformer blocks own a
      cross-attention LayerNorm they never use without cross-attention, and DDP would wait for its gradient forever.
    * ``static_graph=False``: SeLoRA replaces parameters when a rank grows; the trainer then builds a new wrapper
      (``init_sync=False``: every rank grew the same layers from the same weights, nothing to broadcast).
    * ``broadcast_buffers=False``: UNETR (instance norm) and the DDPM (group norm) keep no running statistics; the
      buffers they have are fixed (LoRA-PT's folded residuals, tCURLoRA's C and R) and would be re-sent every step.
    """
    from torch.nn.parallel import DistributedDataParallel

    import inspect

    import warnings

    # LoRA-PT's rank-1 factors (n, d, 1) get gradients whose stride along the size-1 axis differs from the bucket's;
    # DDP then warns on every step that the copy into its bucket is strided. The values are the same and the copy
    # happens either way (the gradients are not bucket views): nothing to act on.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    accepts = inspect.signature(DistributedDataParallel.__init__).parameters
    options: dict[str, Any] = {}
    if "init_sync" in accepts:  # torch >= 2.3
        options["init_sync"] = init_sync
    # the newer name of broadcast_buffers=False (torch 2.13 deprecates the old one; both leave the init sync alone)
    options["forward_sync_buffers" if "forward_sync_buffers" in accepts else "broadcast_buffers"] = False
    return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=find_unused, **options)



class _SumOverRanks(torch.autograd.Function):
    """``all_reduce(SUM)`` that gradients flow through (nnU-Net's ``AllGatherGrad``, summed): the forward gives
    every rank the sum of all ranks' tensors; the backward sums the ranks' gradients of that sum, each rank keeping
    its own input's share. Under DDP's gradient averaging this makes a loss of the summed statistics train as if one
    process had computed it on the whole global batch (see :func:`sum_over_ranks`)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = tensor.detach().clone()
        _run_collective(lambda: torch.distributed.all_reduce(total))
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        total = grad.detach().clone().contiguous()
        _run_collective(lambda: torch.distributed.all_reduce(total))
        return total


def sum_over_ranks(tensor: torch.Tensor, ctx: Distributed | None = None) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, differentiable; the tensor itself in a one-process job.

    Why the backward also sums: rank r's loss is f(S) with S = Σ s_r; its autograd reaches only its own s_r, with
    ∂f/∂S. Summing that over the W ranks gives W·∂f/∂S, and DDP's average over ranks of W·∂f/∂S·∂s_r/∂θ is
    ∂f/∂S·Σ_r ∂s_r/∂θ = ∂f(S)/∂θ: the one-process gradient of the whole batch."""
    ctx = ctx or current()
    if not ctx.active:
        return tensor
    return _SumOverRanks.apply(tensor)
