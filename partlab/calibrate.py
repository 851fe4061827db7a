"""The machine as `partlab plan --validate` sees it, measured: PROCESSES gloo processes, both
busy at once as in a run (the runs' pinning too), time what the step model
(partlab/theory/step.py) takes as given:
  compute     a process's matmul peak, and each stage's forward and backward of one
              microbatch alone (on CPU a small layer's rate depends on its shape, so stages are
              timed rather than their FLOPs assumed); a tensor-parallel rank's model as its
              driver builds it, on a fake process group whose collectives cost nothing
  schedules   each pipeline schedule's step on a model too small to compute anything: what the
              schedule adds to each call (its Python, its messages' posting and waiting)
  memory      the bandwidth of a pass over a large tensor (the optimizer's update)
  collectives all_reduce at two sizes (bandwidth), all_gather beside it (a message's latency,
              and the call's own), a ping-pong (a message point to point)
Short calls are timed by the mean of many: a step adds them up, and on this VM one gloo call
in several stalls for milliseconds, which a median would hide and a step pays.

torchrun runs this module as the worker; `calibrate` launches it and fits the model's figures.
"""
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist

from partlab import distributed, lab, missing_torch_feature
from partlab import model as models
from partlab.config import Settings
from partlab.harness import matmul_tflops
from partlab.partition import dtensor_plan, stage_layers
from partlab.report import write_json
from partlab.stages import build_pipeline
from partlab.theory import pipeline
from partlab.theory.step import Machine
from partlab.tp_gpt import TensorParallelGPT
from partlab.tp_layers import ColumnRowParallelMLP

try:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor.parallel import loss_parallel, parallelize_module
except ImportError as e:
    raise SystemExit(missing_torch_feature("torch.distributed.tensor.parallel", e)) from None

PROCESSES = 2
# Bytes: a latency-bound size, and one whose bandwidth term (~20 ms on gloo) dwarfs the noise.
SIZES = (4096, 16 * 2**20)
STREAM = 2**24                              # floats a memory-bandwidth pass adds


def seconds_per_call(once, per_block=1, blocks=7):
    """The median over `blocks` of a block's mean call, every rank calling at once (a barrier
    first): in a run the ranks compute together, and two processes can share what one alone
    would have. A step adds its calls' times, so a short call is timed by the mean of many,
    not its median: one gloo call in several stalls for milliseconds (a 4 KiB all_reduce
    here: median 0.4 ms, 90th percentile 4 ms, mean 1.6 ms), which a median hides and a step
    pays."""
    once()
    dist.barrier()
    samples = []
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(per_block):
            once()
        samples.append((time.perf_counter() - start) / per_block)
    return statistics.median(samples)


def stage_call(s, layers, tp, impl, group):
    """What one rank computes for a microbatch through a stage of `layers`: (module, a function
    returning what its backward starts from, the context both run in). A pipeline's stage as
    plain modules (the last with its loss); a tensor-parallel rank's whole model as its driver
    builds it, on `group`, a fake process group whose collectives cost their call and nothing
    more: the step model times the communication itself."""
    batch = s.batch_size // (s.microbatches or 1)
    cpu = torch.device("cpu")
    if tp > 1:
        module, loss_of, context = tensor_parallel_rank(s, impl, group)
        x, target = models.make_batch(s, 0, cpu)
        return module, lambda: loss_of(module(x), target), context
    module, dtype = models.build_model(s, cpu, keep=layers), models.DTYPES[s.dtype]
    if s.model == "gpt":
        x = torch.randint(s.vocab_size, (batch, s.seq_len)) if layers[0] == 0 else \
            torch.randn(batch, s.seq_len, s.hidden_dim, dtype=dtype, requires_grad=True)
        target = torch.randint(s.vocab_size, (batch, s.seq_len))
    else:
        x = torch.randn(batch, models.mlp_dims(s)[layers[0]], dtype=dtype,
                        requires_grad=layers[0] > 0)
        target = torch.randint(s.num_classes, (batch,))
    last = layers[-1] == s.layers - 1
    return module, lambda: models.loss_fn(module(x), target) if last else \
        module(x).float().sum(), contextlib.nullcontext


def tensor_parallel_rank(s, impl, group):
    """(module, loss_of, loss context) of a rank of tensor_parallel_{impl} on `group`."""
    full = models.build_model(s, torch.device("cpu"))
    if impl == "native":
        mesh = DeviceMesh.from_group(group, "cpu")
        module = parallelize_module(full, mesh, dtensor_plan(full, s.sequence_parallel))
        return module, models.loss_fn, \
            loss_parallel if s.model == "gpt" else contextlib.nullcontext
    if s.model == "gpt":
        module = TensorParallelGPT(full, s.vocab_size, group=group, fused=s.fused,
                                   sequence_parallel=s.sequence_parallel)
        return module, module.loss, contextlib.nullcontext
    return ColumnRowParallelMLP(full, group=group, fused=s.fused), models.loss_fn, \
        contextlib.nullcontext


def stage_seconds(s, layers, tp, impl, group):
    """(forward, backward) seconds of a microbatch through the stage."""
    module, loss, context = stage_call(s, layers, tp, impl, group)

    def both():
        module.zero_grad(set_to_none=True)
        loss().backward()
    with context():
        f = seconds_per_call(loss, blocks=9)
        return f, max(seconds_per_call(both, blocks=9) - f, 0.0)


def worker(calls_path, out):
    """Each of PROCESSES ranks, all at once: the matmul peak; each stage call in `calls_path`
    (JSON {"stages": [[settings, layers, tp, impl], ...], "schedules": [[schedule, m, v],
    ...]}); each schedule's step on a model too small to compute anything, and its stage calls
    alone; a memory pass; then rank 0's view of all_reduce, all_gather and a ping-pong's
    one-way send, per size."""
    try:
        import torch.testing._internal.distributed.fake_pg  # noqa: F401 (registers "fake")
    except ImportError as e:
        raise SystemExit(missing_torch_feature("torch's fake process group", e)) from None
    launch = distributed.launch_env()
    distributed.pin_to_own_cores(launch)                         # as the runs are
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    fake = dist.new_group(backend="fake")
    dist.barrier()
    rate = matmul_tflops(torch.device("cpu"), torch.float32)
    with open(calls_path) as f:
        calls = json.load(f)
    stages = [stage_seconds(Settings(**settings), range(*layers), tp, impl, fake)
              for settings, layers, tp, impl in calls["stages"]]
    group = distributed.Group(launch.rank, PROCESSES, torch.device("cpu"), "gloo")
    schedules = [schedule_seconds(tiny_pipeline(*schedule), group, fake)
                 for schedule in calls["schedules"]]
    a, b = torch.zeros(STREAM), torch.ones(STREAM)
    stream = seconds_per_call(lambda: a.add_(b))
    small = torch.zeros(min(SIZES) // 4)
    gathered = torch.zeros(PROCESSES * small.numel())
    times = {"all_gather": {min(SIZES): seconds_per_call(
        lambda: dist.all_gather_into_tensor(gathered, small), per_block=10)},
        "all_reduce": {}, "send": {}}
    for size in SIZES:
        x = torch.zeros(size // 4)
        for op, once in (("all_reduce", dist.all_reduce), ("send", ping_pong)):
            times[op][size] = seconds_per_call(lambda call=once, x=x: call(x), per_block=10) \
                / (2 if op == "send" else 1)
    if dist.get_rank() == 0:
        write_json({"tflops": rate, "stages": stages, "schedules": schedules,
                    "stream_s": stream, "seconds": times}, out)
    dist.destroy_process_group()


def tiny_pipeline(schedule, m, v):
    """An MLP of a stage per layer, 8 wide, one sample a microbatch: what the schedule costs
    beyond its stages' work."""
    return Settings(layers=PROCESSES * v, input_dim=8, hidden_dim=8, num_classes=2,
                    batch_size=m, microbatches=m, schedule=schedule, virtual_stages=v)


def schedule_seconds(s, group, fake):
    """{"step_s": a step of Settings `s`'s pipeline, "stages": each stage's (forward,
    backward) alone}."""
    step = build_pipeline(s, group, group.rank, PROCESSES)[0]
    x, y = models.make_batch(s, 0, group.device)
    total = PROCESSES * s.virtual_stages
    return {"step_s": seconds_per_call(lambda: step(x, y), per_block=5),
            "stages": [stage_seconds(s, stage_layers(s.layers, st, total), 1, None, fake)
                       for st in range(total)]}


def ping_pong(x):
    """Rank 0 sends x to rank 1 and back: two one-way messages."""
    if dist.get_rank() == 0:
        dist.send(x, 1)
        dist.recv(x, 1)
    else:
        dist.recv(x, 0)
        dist.send(x, 0)


def fit(seconds):
    """(seconds at no bytes, GB/s) from the two sizes' times: a + bytes / bandwidth."""
    (small, t_small), (large, t_large) = sorted(seconds.items())
    per_byte = (t_large - t_small) / (large - small)
    if per_byte <= 0:
        raise SystemExit(f"partlab: error: the calibration's {large:,}-byte messages took no "
                         f"longer than its {small:,}-byte ones ({t_large * 1e3:.2f} vs "
                         f"{t_small * 1e3:.2f} ms): the machine is too busy to measure; run "
                         "again when it is quieter")
    return max(t_small - small * per_byte, 0), 1 / per_byte / 1e9


def schedule_overhead(schedule, m, v, measured, message_s):
    """What `schedule` adds to each call: the c that, added to every call of its order (its
    stages' measured costs), makes the simulated step the measured tiny one."""
    orders = pipeline.order(schedule, PROCESSES, m, v)
    stage_s = measured["stages"]

    def span(c):
        return pipeline.span(pipeline.simulate(
            orders, lambda kind, stage: pipeline.call_cost(kind, *stage_s[stage], c), message_s))
    low, high = 0.0, measured["step_s"]
    if span(low) >= measured["step_s"]:
        return 0.0
    for _ in range(40):
        low, high = ((low + high) / 2, high) if span((low + high) / 2) < measured["step_s"] \
            else (low, (low + high) / 2)
    return low


def calibrate(calls, schedules):
    """This machine as the planner sees it, measured with PROCESSES gloo processes: (Machine,
    what each schedule [schedule, m, v] in `schedules` adds to a call, the measurements: among
    them the (forward, backward) seconds of each stage call [settings, layers, tp, impl] in
    `calls`)."""
    with tempfile.TemporaryDirectory() as tmp:
        out, calls_path = os.path.join(tmp, "calibration.json"), os.path.join(tmp, "calls.json")
        write_json({"stages": calls, "schedules": schedules}, calls_path)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(PROCESSES), "-m", "partlab.calibrate", calls_path, out]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit("partlab: error: the calibration failed:\n"
                             + "\n".join(lab.failure_lines(proc)))
        with open(out) as f:
            measured = json.load(f)
    return (*figures(measured, schedules), measured)


def figures(measured, schedules):
    """(Machine, {schedule: seconds it adds to a call}) from the worker's measurements. On
    PROCESSES = 2 ranks a ring all_reduce's wire bytes are its payload and an all_gather's its
    input, which the fits below take as read."""
    seconds = {op: {int(k): v for k, v in by_size.items()}
               for op, by_size in measured["seconds"].items()}
    # On 2 ranks an all_reduce is the call and 2 messages, an all_gather of the same wire
    # bytes the call and 1: the difference is a message's latency, the rest the call's.
    reduce_s, gbps = fit(seconds["all_reduce"])
    small = min(seconds["all_gather"])
    latency = max(reduce_s - (seconds["all_gather"][small] - small / (gbps * 1e9)), 0)
    p2p_latency, _ = fit(seconds["send"])
    machine = Machine(name="this machine (gloo, CPU)", gpus_per_node=PROCESSES,
                      memory_gib=float("inf"), peak_tflops=measured["tflops"], efficiency=1.0,
                      intra_gbps=gbps, inter_gbps=gbps, intra_latency_us=latency * 1e6,
                      inter_latency_us=latency * 1e6, p2p_latency_us=p2p_latency * 1e6,
                      call_latency_us=max(reduce_s - 2 * latency, 0) * 1e6,
                      memory_gbps=3 * 4 * STREAM / measured["stream_s"] / 1e9)
    overhead = {tuple(sch): schedule_overhead(*sch, timed, p2p_latency)
                for sch, timed in zip(schedules, measured["schedules"], strict=True)}
    return machine, overhead


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
