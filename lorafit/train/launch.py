"""How the program was launched: which rank this process is, and the processes `accelerate launch` left out.

Nothing here imports torch, so `lorafit --help` and one-line errors stay fast.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from lorafit.errors import LorafitError


def rank() -> int:
    """This process's rank as the launcher set it (0 when not launched as one of several)."""
    return int(os.environ.get("RANK", "0"))


def launched_processes_missing() -> bool:
    """`accelerate launch --num_processes N` on a machine without GPUs starts one process, not N.

    Its single-process launcher sets MASTER_ADDR only when more than one process was asked for, and nothing
    (WORLD_SIZE, an MPI size) then says how many processes exist.
    """
    sizes = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in os.environ
    return launched_by_accelerate and "MASTER_ADDR" in os.environ and not any(k in os.environ for k in sizes)


def relaunch_command(argv: list[str]) -> list[str] | None:
    """The torchrun command for the processes `accelerate launch --num_processes N` meant to start, or None.

    accelerate launches one process when it finds no GPUs and --multi_gpu is not given; its command line
    (our parent's) says how many were asked for, so lorafit starts them itself, as --multi_gpu would.
    """
    if not launched_processes_missing():
        return None
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        parent = []
    # `accelerate launch ...`, `accelerate-launch ...` or `python -m accelerate.commands.launch ...`
    starts = [i for i, arg in enumerate(parent) if arg == "launch" or arg.endswith(("commands.launch", "accelerate-launch"))]
    if not starts:
        raise LorafitError("accelerate started one process where more were asked for; add --multi_gpu to "
                           "accelerate launch, or use torchrun --nproc_per_node N -m lorafit")
    from accelerate.commands.launch import launch_command_parser

    asked = launch_command_parser().parse_args(parent[starts[0] + 1 :])
    machines = asked.num_machines or 1
    return [
        sys.executable, "-m", "torch.distributed.run",
        f"--nproc_per_node={asked.num_processes // machines}", f"--nnodes={machines}",
        f"--node_rank={asked.machine_rank or 0}",
        f"--master_addr={os.environ['MASTER_ADDR']}", f"--master_port={os.environ['MASTER_PORT']}",
        "-m", "lorafit", *argv,
    ]


def hsdp_shape(world: int, shard_size: int = 0) -> tuple[int, int]:
    """(replicas, processes per shard group) of the HSDP mesh: `shard_size`, or by default the processes of one
    machine (LOCAL_WORLD_SIZE, which torchrun and accelerate launch set)."""
    shard = shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if world % shard:
        raise LorafitError(
            f"[train] parallel = 'hsdp' shards the model over groups of {shard} processes, which does not divide "
            f"the {world} processes; set [train] shard_size to a divisor of {world}, e.g. the GPUs of one machine"
        )
    return world // shard, shard
