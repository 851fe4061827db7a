"""Process-group lifecycle shared by the drivers: launch environment, device and backend choice,
the cross-rank settings check, rank-0 logging, and turning user mistakes into one-line errors.

The handout's troubleshooting section lives here as code: everything a user can get wrong is
checked before the first collective, and a collective that waits too long raises instead of
hanging (the process-group timeout, `--timeout`).
"""
import dataclasses
import datetime
import os
import socket
import sys
import zlib

import torch
import torch.distributed as dist

from partlab.config import UsageError, parse, require


@dataclasses.dataclass(frozen=True)
class Launch:
    """What torchrun told this process (or a one-process world when started without torchrun)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


@dataclasses.dataclass(frozen=True)
class Group:
    """This process's place in the initialised process group."""

    rank: int
    world_size: int
    device: torch.device
    backend: str


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env():
    """Read torchrun's variables; without them run as a world of one on a free local port."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    world = int(os.environ["WORLD_SIZE"])
    return Launch(rank=int(os.environ["RANK"]), world_size=world,
                  local_rank=int(os.environ.get("LOCAL_RANK", 0)),
                  local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)))


def choose_device(settings, launch):
    """One GPU per process with NCCL when asked for or when there are enough; else CPU + gloo."""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if settings.device == "cuda":
        require(gpus > 0, "--device cuda but torch sees no GPU: use --device cpu "
                          f"(torch {torch.__version__}, CUDA build: {torch.version.cuda})")
        require(gpus >= launch.local_world_size,
                f"{launch.local_world_size} processes on this node but {gpus} GPU(s): "
                f"set --nproc_per_node {gpus} (one process per GPU)")
    use_cuda = settings.device == "cuda" or (settings.device == "auto"
                                             and gpus >= launch.local_world_size)
    if use_cuda:
        return torch.device("cuda", launch.local_rank), "nccl"
    if settings.device == "auto" and gpus and launch.local_rank == 0:
        print(f"partlab: {launch.local_world_size} processes on this node but {gpus} GPU(s): "
              "running on CPU with gloo (--device cuda makes this an error)", file=sys.stderr)
    return torch.device("cpu"), "gloo"


def init(settings, launch):
    device, backend = choose_device(settings, launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=settings.timeout),
                                device_id=device if device.type == "cuda" else None)
    except dist.DistNetworkError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            port = os.environ.get("MASTER_PORT")
            raise UsageError(f"port {port} is already in use: set MASTER_PORT to a free port "
                             "(or launch with torchrun --standalone)") from None
        raise
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                 backend=backend)


def verify_same_settings(settings, group):
    """One small all_gather of per-flag hashes: every rank must have been given the same flags."""
    fields = [f.name for f in dataclasses.fields(settings)]
    mine = torch.tensor([zlib.crc32(repr(getattr(settings, f)).encode()) for f in fields],
                        dtype=torch.int64, device=group.device)
    everyone = [torch.empty_like(mine) for _ in range(group.world_size)]
    dist.all_gather(everyone, mine)
    for rank, theirs in enumerate(everyone):
        for name, a, b in zip(fields, everyone[0].tolist(), theirs.tolist()):
            require(a == b, f"rank {rank} was launched with a different --{name.replace('_', '-')} "
                            "than rank 0: start every rank with the same command and flags")


def log(group, *args):
    if group.rank == 0:
        print(*args, flush=True)


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(parser, validate, train, argv=None):
    """A driver's whole life: parse, validate, join the group, check flags agree, train.

    Returns the exit status: 0 ok, 1 failed (deviation beyond tolerance under --check, or a
    collective error such as a timeout), 2 a usage mistake (reported once per node, one line).
    """
    launch = None
    try:
        settings = parse(parser, argv)
        launch = launch_env()
        validate(settings, launch)
        group = init(settings, launch)
        verify_same_settings(settings, group)
        status = train(settings, group)
        dist.destroy_process_group()
        return status
    except UsageError as e:
        if launch is None or launch.local_rank == 0:
            print(f"partlab: error: {e}", file=sys.stderr, flush=True)
        return 2
    except dist.DistError as e:
        # A peer died or hung: say so in one line; torchrun's report names the failed rank.
        rank = launch.rank if launch else "?"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"partlab: error: rank {rank}: collective failed ({type(e).__name__}): {first}\n"
              "partlab: another rank crashed, hung or was launched differently; its own output "
              "says why (raise --timeout if it is only slow)", file=sys.stderr, flush=True)
        return 1
