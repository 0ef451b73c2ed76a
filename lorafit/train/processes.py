"""More than one process: how a launch becomes a process group, what ranks add up and agree on, and FSDP2.

The result must not depend on how many processes computed it. Every rank holds the whole tokenized data
and the same step plan (lorafit.data.batches), so a rank knows the step's global supervised-token count without
asking anyone; it takes its share of the step's rows, and the sums that are logged or evaluated are
all-reduced here, as is the decision to stop.

Strategies: plain DDP (the frozen model replicated; LoRA gradients are tiny, so it scales almost
perfectly), FSDP2 (`fully_shard` per decoder block, then the root) for a model that does not fit one
device, or HSDP (the same on a 2-D mesh: sharded over the processes of a machine, replicated across
machines, so that only the tiny gradients cross the network). FSDP1's flat parameters cannot mix a bf16
base with fp32 LoRA weights, so it is not offered.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from datetime import timedelta

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import nn

from lorafit.errors import LorafitError
from lorafit.train.launch import hsdp_shape

CONNECT_TIMEOUT = timedelta(seconds=60)  # for the processes to reach each other; a wrong interface fails within it
VOTE_TIMEOUT = timedelta(minutes=30)  # then a vote waits as long as torch's default for any collective


def make_accelerator(mixed_precision: str, **options) -> Accelerator:
    """The Accelerator for however the program was launched: torchrun, accelerate launch, or plain python.

    Without GPUs accelerate would leave torchrun's processes unconnected, each training alone on the same
    folder; `cpu=True` there makes them one gloo group instead. On CUDA, float32 matmuls use TF32.
    The mixed precision is this run's: a process that trains again (a sweep, a test) may choose another,
    which accelerate's process-wide state would otherwise refuse. The process group is kept.
    `options` go to the Accelerator as they are (the trackers' log_with and project_dir).
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, **options)
    except RuntimeError as error:
        if not (dist.is_available() and dist.is_torchelastic_launched()):
            raise
        raise _unconnected(error) from None
    connect_votes()
    return accelerator


def _unconnected(error: BaseException) -> LorafitError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[-1]
    return LorafitError(
        f"the processes could not connect to each other ({reason}); check that every machine reaches "
        "MASTER_ADDR:MASTER_PORT and set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME on GPUs) to the network "
        "interface they share"
    )


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum `values` over all processes (one all-reduce); the values themselves with one process."""
    return _all_reduce(values, device, "sum")


def all_max(values: list[float], device: torch.device) -> list[float]:
    """The largest of each value over all processes; the values themselves with one process."""
    return _all_reduce(values, device, "max")


def _all_reduce(values: list[float], device: torch.device, op: str) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return tensor.tolist()


_votes = None  # the process group for any_rank: gloo on the CPU, whatever the training backend


def connect_votes() -> None:
    """Make any_rank's gloo group now, before the model loads, and cast a first vote: processes that cannot
    reach each other (a wrong network interface, an unreachable host) fail here within a minute, with one line,
    instead of hanging for torch's 30 minutes at the first step."""
    global _votes
    if _votes is not None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    try:
        votes = dist.new_group(backend="gloo", timeout=CONNECT_TIMEOUT)
        dist.all_reduce(torch.zeros(1), group=votes)
    except (RuntimeError, dist.DistError) as error:
        raise _unconnected(error) from None
    from torch.distributed.distributed_c10d import _set_pg_timeout

    _set_pg_timeout(VOTE_TIMEOUT, votes)  # a rank may reach a vote minutes after another (compiling, say)
    _votes = votes


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on any: a CPU all-reduce, so a GPU stream is never waited for."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    connect_votes()
    vote = torch.tensor([int(flag)])
    dist.all_reduce(vote, group=_votes)
    return bool(vote.item())


def all_gather_objects(value) -> list:
    """Every rank's `value`, in rank order (a one-element list with one process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


class StopRequest:
    """The signals received. While `deferred` (the training steps), the first one only asks the loop to stop
    after its step, so that a checkpoint can be saved; any other raises KeyboardInterrupt at once."""

    def __init__(self):
        self.signals: list[int] = []
        self.deferred = False

    def __bool__(self) -> bool:
        return bool(self.signals)


@contextmanager
def stop_on_signals():
    """SIGINT and SIGTERM as a StopRequest: SIGTERM stops a run the way Ctrl-C does, in every phase."""
    stop = StopRequest()

    def request_stop(signum, _frame):
        stop.signals.append(signum)
        if not (stop.deferred and len(stop.signals) == 1):
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield stop  # signal handlers can only be installed from the main thread
        return
    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def shard_model(scorer: nn.Module, blocks: nn.ModuleList, device: torch.device, *, hybrid: bool = False,
                shard_size: int = 0) -> nn.Module:
    """`fully_shard` each decoder block, then the root; the optimizer is built after this.

    Over all processes (FSDP2), or with `hybrid` over a 2-D mesh (HSDP): each group of `shard_size`
    processes (by default a machine's) holds one sharded copy, and the groups replicate it. Gradients are
    averaged over every process either way.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    world = dist.get_world_size()
    if hybrid:
        mesh = init_device_mesh(device.type, hsdp_shape(world, shard_size), mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (world,))
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(scorer, mesh=mesh)
    return scorer


def mesh_shape(module: nn.Module) -> dict[str, int] | None:
    """Processes per dimension of the device mesh FSDP2 or HSDP sharded `module` over; None when not sharded."""
    from torch.distributed.tensor import DTensor

    sharded = next((p for p in module.parameters() if isinstance(p, DTensor)), None)
    if sharded is None:
        return None
    mesh = sharded.device_mesh
    return dict(zip(mesh.mesh_dim_names or ("shard",), mesh.shape))


def like(full: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`full` laid out as `reference` is: this rank's shard of it when `reference` is sharded (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(reference, DTensor):
        return full.to(reference.device)
    full = full.to(reference.device, reference.dtype)
    return distribute_tensor(full, reference.device_mesh, reference.placements, src_data_rank=None)
