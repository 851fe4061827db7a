"""Process-group lifecycle shared by the drivers: launch environment, device and backend choice,
the cross-rank settings check, and turning user mistakes into one-line errors.

The handout's troubleshooting section lives here as code: everything a user can get wrong is
checked before the first collective, and a collective that waits too long raises instead of
hanging (the process-group timeout, `--timeout`).
"""
import dataclasses
import datetime
import importlib.util
import os
import re
import socket
import sys
import time
import traceback
import zlib

import torch
import torch.distributed as dist

from partlab import checkpoint, nvidia
from partlab.config import UsageError, parse, require
from partlab.theory.memory import bytes_needed


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
    if settings.device == "auto" and launch.local_rank == 0:
        fallback_note(gpus, launch)
    return torch.device("cpu"), "gloo"


def fallback_note(gpus, launch):
    """`--device auto` on CPU on a machine with GPUs: one line per node saying why."""
    if gpus:
        why = f"{launch.local_world_size} processes on this node but {gpus} GPU(s)"
    else:
        missing = nvidia.unseen(torch.__version__, torch.version.cuda)
        if missing is None:
            return
        why = str(missing)
    print(f"partlab: {why}: running on CPU with gloo (--device cuda makes this an error)",
          file=sys.stderr)


def pin_to_own_cores(launch):
    """CPU runs: give each of this node's processes its own share of the allowed logical CPUs.

    Unpinned, the scheduler moves ranks and gloo's threads between CPUs, and every step where
    two land on one CPU stalls the other ranks in the next collective (a third of the steps on
    a 2-core machine took twice as long). Done before init so gloo's threads inherit it; skipped
    when there are fewer CPUs than processes, off Linux, and with PARTLAB_PIN=0 (e.g. several
    runs sharing one machine, which would all pin to the same first CPUs).
    """
    if os.environ.get("PARTLAB_PIN") == "0" or not hasattr(os, "sched_getaffinity"):
        return
    cores = sorted(os.sched_getaffinity(0))
    share = len(cores) // launch.local_world_size
    if launch.local_world_size > 1 and share >= 1:
        os.sched_setaffinity(0, cores[launch.local_rank * share:(launch.local_rank + 1) * share])


def available_bytes(device, launch):
    """What one process may use: the GPU's free memory, or this node's available RAM shared by
    its processes (None where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None
    return kib * 1024 // launch.local_world_size


def check_memory(settings, device, launch):
    """Refuse, in one line, sizes that cannot fit, before anything is allocated."""
    need, have = bytes_needed(settings), available_bytes(device, launch)
    n = launch.local_world_size
    where = f"GPU {device.index}" if device.type == "cuda" else \
        "this node" if n == 1 else f"each of this node's {n} processes"
    require(have is None or need <= have,
            f"the model needs at least {need / 2**30:,.1f} GiB per process (full weights from the "
            f"seed and the reference's weights and gradients) but {where} has "
            f"{have / 2**30:,.1f} GiB available: lower --hidden-dim, --input-dim, --layers or "
            "--batch-size")


def init(settings, launch):
    device, backend = choose_device(settings, launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        pin_to_own_cores(launch)
    check_memory(settings, device, launch)
    timeout = datetime.timedelta(seconds=settings.timeout)
    store = restart_store(launch, timeout)
    try:
        dist.init_process_group(backend, timeout=timeout,
                                device_id=device if device.type == "cuda" else None,
                                **({"store": store, "rank": launch.rank,
                                    "world_size": launch.world_size} if store else {}))
    except dist.DistNetworkError as e:
        if "EADDRINUSE" in str(e) or "address already in use" in str(e).lower():
            port = os.environ.get("MASTER_PORT")
            raise UsageError(f"port {port} is already in use: set MASTER_PORT to a free port "
                             "(or launch with torchrun --standalone)") from None
        raise
    return Group(rank=dist.get_rank(), world_size=dist.get_world_size(), device=device,
                 backend=backend)


def restart_store(launch, timeout):
    """After torchrun restarts a failed group (--max-restarts), the workers' store is still the
    rendezvous store torchrun keeps, holding the dead attempt's keys, so gloo can read a dead
    peer's address and fail to connect (pytorch/pytorch#135712). A prefix per attempt keeps the
    attempts apart; None (torch's own env:// store) for a first attempt."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if attempt == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          launch.world_size, is_master=False, timeout=timeout)
    return dist.PrefixStore(f"partlab/attempt_{attempt}", store)


def verify_same_settings(settings, group):
    """One small all_gather of per-flag hashes: every rank must have been given the same flags."""
    fields = [f.name for f in dataclasses.fields(settings)]
    mine = torch.tensor([zlib.crc32(repr(getattr(settings, f)).encode()) for f in fields],
                        dtype=torch.int64, device=group.device)
    everyone = [torch.empty_like(mine) for _ in range(group.world_size)]
    dist.all_gather(everyone, mine)
    for rank, theirs in enumerate(everyone):
        for name, a, b in zip(fields, everyone[0].tolist(), theirs.tolist(), strict=True):
            require(a == b, f"rank {rank} was launched with a different --{name.replace('_', '-')} "
                            "than rank 0: start every rank with the same command and flags")


def run(parser, validate, work, argv=None):
    """A driver's whole life: parse, validate (which returns the settings with the driver's
    defaults filled in), join the group, check flags agree, then work(settings, group) -> exit
    status (train and report: report.train_and_report).

    Exit status: 0 ok, 1 failed (deviation beyond tolerance under --check, or a collective
    error such as a timeout), 2 a usage mistake (reported in one line, once per node). A driver
    run as a program ends through exit_process.
    """
    launch = launch_env()
    try:
        settings = validate(parse(parser, argv), launch)
        check_outputs(settings, launch)
        if checkpoint.check(settings) >= settings.steps:   # only a restart after the last save
            if launch.rank == 0:
                print(f"partlab: the run's last step ({settings.steps}) is saved in "
                      f"{settings.checkpoint_dir} already: nothing is left to train")
            return 0
        group = init(settings, launch)
    except UsageError as e:
        return usage_error(e, launch)
    try:
        verify_same_settings(settings, group)
        status = work(settings, group)
        dist.barrier()  # leave together: a rank that tears down early can abort gloo peers
    except UsageError as e:      # found once the group exists (--resume's damaged checkpoint)
        dist.destroy_process_group()
        return usage_error(e, launch)
    except (dist.DistError, RuntimeError) as e:
        failure = collective_failure(e)
        if failure is None:
            raise  # not a communication failure: a bug, keep its traceback
        print(f"partlab: error: rank {launch.rank}: {failure}\npartlab: another rank crashed, "
              "hung or was launched differently; its own output says why (raise --timeout if "
              "it is only slow)", file=sys.stderr, flush=True)
        return 1
    dist.destroy_process_group()
    return status


def exit_process(status):
    """End a driver's process with `status`, skipping interpreter finalization: once a process
    group has existed, gloo's worker threads can abort a finished process while Python tears
    down ("terminate called without an active exception", seen under heavy load; see
    pytorch/pytorch#179291). Everything is written and flushed first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def collective_failure(error):
    """'all_reduce failed in tp_layers.py:42 (forward): <torch's reason>' when
    `error` was raised inside a torch.distributed collective, else None."""
    frames = traceback.extract_tb(error.__traceback__)
    comm = [f for f in frames if f.filename.endswith(("distributed_c10d.py",
                                                       "_functional_collectives.py"))]
    if not comm and not isinstance(error, dist.DistError):
        return None
    ours = [f for f in frames if f"{os.sep}partlab{os.sep}" in f.filename]
    where = f" in {os.path.basename(ours[-1].filename)}:{ours[-1].lineno} ({ours[-1].name})" \
        if ours else ""
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    reason = re.sub(r"^\[[^\]]*\]\s*", "", reason)  # drop gloo's "[path/file.cc:78]" prefix
    return f"{comm[-1].name if comm else 'collective'} failed{where}: {reason}"


def check_outputs(settings, launch):
    """Rank 0 writes --json and --timeline after training: check before training that it can."""
    if launch.rank != 0:
        return
    for flag, path in (("--json", settings.json), ("--timeline", settings.timeline)):
        folder = os.path.dirname(os.path.abspath(path)) if path else None
        require(folder is None or (os.path.isdir(folder) and os.access(folder, os.W_OK)),
                f"{flag} {path}: {folder} is not a writable directory: create it or write "
                "somewhere else")
    require(not settings.timeline or importlib.util.find_spec("matplotlib"),
            "--timeline draws with matplotlib, which is not installed: pip install matplotlib")


def usage_error(error, launch):
    """Local rank 0 reports the mistake (every rank found it). The others wait a moment before
    exiting: torchrun stops a node's processes when one exits non-zero, and on a loaded machine
    it could stop rank 0 before it has printed."""
    if launch.local_rank == 0:
        print(f"partlab: error: {error}", file=sys.stderr, flush=True)
    else:
        time.sleep(1)
    return 2
