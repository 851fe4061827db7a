"""A layout's step, predicted: per-GPU memory (weights, gradients, optimizer state,
activations) and step time (compute, the tensor-parallel collectives it waits for, the
pipeline's bubble and messages, the data-parallel gradient all_reduce), from the model's sizes
and a machine's rates. `partlab plan` ranks layouts with it; `partlab plan --validate` checks
it against the lab's own runs on this machine.

The model (each part built on the rest of partlab/theory):
  compute      stage_flops / tp at `efficiency` x the peak (large matmuls; small ones are no
               slower per FLOP here, so the microbatch size only matters through the bubble,
               the messages and memory); or, where a micro-benchmark timed the stage calls
               themselves (`partlab plan --validate`), those times
  optimizer    one pass over the rank's state (read and written) at the memory's bandwidth
  tensor       per microbatch and stage, its collectives (tp_messages: all_reduces, or SP's
  parallel     all_gathers and reduce_scatters and its norms' gradients), ring-timed: the
               call's own latency, one per message (2(t-1) for an all_reduce) and what the
               rank sends at the link's bandwidth, exposed (nothing overlaps them); within a
               node when t fits
  pipeline     the schedule's order simulated (theory.pipeline) with those call costs, each
               activation or gradient crossing ranks a message: latency + bytes / bandwidth,
               across nodes when t x d fills a node (Megatron's rank order: tp, dp, pp); plus,
               where measured (`--validate`), what the schedule itself adds to each call
               SP's norm gradients (tp_messages' per step) once a step, exposed
  data         one ring all_reduce of the rank's gradients after the last backward, exposed
  parallel
  memory       parameters / t (every tensor split, a slight under-count of the replicated
               norms and biases) x state_bytes, and the schedule's activations alive
               (memory.pipeline_activation_bytes); with full recomputation only each block's
               input stays per microbatch (1/t under SP), plus one block's whole while it
               recomputes
The host's time per call (a collective's own latency, the schedule's Python) is 0 in the
cluster presets: on a GPU it overlaps the kernels queued before it, and a cluster-scale
stage's calls are milliseconds of matmuls. On the lab's CPU runs it is measured, and counts.
"""
import dataclasses
import functools

from partlab.model import mlp_dims, parameter_count
from partlab.partition import stage_ids, stage_layers
from partlab.theory import comm, compute, memory, pipeline


@dataclasses.dataclass(frozen=True)
class Machine:
    name: str
    gpus_per_node: int
    memory_gib: float
    peak_tflops: float          # per GPU, in the run's dtype
    efficiency: float           # the share of the peak a large matmul reaches
    intra_gbps: float           # GB/s one GPU sends to another in its node
    inter_gbps: float           # GB/s one GPU sends to another node
    intra_latency_us: float
    inter_latency_us: float
    memory_gbps: float          # the optimizer's update streams the state at this rate
    usable: float = 0.9         # of memory_gib: the rest for the context, buffers, fragments
    p2p_latency_us: float | None = None   # a pipeline message's, where not the link's
    call_latency_us: float = 0.0  # a collective call's own, beyond its messages' latencies


@dataclasses.dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    microbatches: int           # per step, per replica
    schedule: str
    virtual: int = 1            # chunks per pipeline rank
    recompute: bool = False
    sequence_parallel: bool = False

    def describe(self):
        v = f" v={self.virtual}" if self.virtual > 1 else ""
        return (f"tp={self.tp} pp={self.pp} dp={self.dp} m={self.microbatches} "
                f"{self.schedule}{v}" + " sp" * self.sequence_parallel
                + " recompute" * self.recompute)


def replica_settings(s, layout):
    """The settings one data-parallel replica runs: its share of the batch, the layout's
    schedule and microbatches."""
    return dataclasses.replace(s, batch_size=s.batch_size // layout.dp,
                               microbatches=layout.microbatches, schedule=layout.schedule,
                               virtual_stages=layout.virtual,
                               sequence_parallel=layout.sequence_parallel)


def tp_messages(s, layers, batch, t, impl="manual"):
    """(forward, backward, per step) [(op, payload bytes)] of the collectives a
    tensor-parallel stage of `layers` issues, forward and backward for each microbatch of
    `batch` samples, and once a step, on t ranks: comm.gpt_tp_comm's and comm.mlp_tp_comm's
    calls, by stage. Under the gpt's SP each block's all_reduce is an all_gather of 1/t of it
    and a reduce_scatter, and each norm's (manual, as Megatron-LM: and row bias's) gradient,
    summed over the step's microbatches, is one all_reduce a step."""
    size = comm.DTYPE_BYTES[s.dtype]
    if s.model == "mlp":
        dims, pairs = mlp_dims(s), [i for i in layers if i % 2 == 0]
        return ([("all_reduce", batch * dims[i + 2] * size) for i in pairs],
                [("all_reduce", batch * dims[i] * size) for i in pairs if i > 0], [])
    activation = batch * s.seq_len * s.hidden_dim * size
    first, last, blocks = layers[0] == 0, layers[-1] == s.layers - 1, len(layers)
    # The embedding's forward, the loss's 3 of a number a token forward.
    forward = [("all_reduce", activation)] * first \
        + [("all_reduce", batch * s.seq_len * comm.LOSS_BYTES)] * 3 * last
    if not s.sequence_parallel:
        # A block's 2 each way, the head's input gradient backward.
        return forward + [("all_reduce", activation)] * 2 * blocks, \
            [("all_reduce", activation)] * (2 * blocks + last), []
    pair = [("all_gather", activation // t), ("reduce_scatter", activation)]
    vectors = (4 + 2 * (impl == "manual")) * blocks + 2 * last
    # Forward: a block's 2 pairs, the head's input gathered. Backward: a block's 2 pairs, the
    # head's input gradient scattered, the embeddings' gathered.
    return (forward + pair * 2 * blocks + [pair[0]] * last,
            pair * 2 * blocks + [pair[1]] * last + [pair[0]] * first,
            [("all_reduce", s.hidden_dim * size)] * vectors)


def collective_seconds(op, payload, ranks, gbps, latency_us, call_us=0.0):
    """One ring collective of `payload` bytes (what a rank hands to it) over `ranks`: the
    call's own latency, one per message (all_reduce 2(t-1), all_gather and reduce_scatter
    t-1) and what the rank sends at the link's bandwidth."""
    if ranks == 1:
        return 0.0
    steps = 2 * (ranks - 1) if op == "all_reduce" else ranks - 1
    return (call_us + steps * latency_us) * 1e-6 \
        + comm.ring_wire_bytes(op, payload, ranks) / (gbps * 1e9)


def link(machine, ranks_apart):
    """(GB/s, latency in us) between two GPUs `ranks_apart` global ranks apart."""
    if ranks_apart < machine.gpus_per_node:
        return machine.intra_gbps, machine.intra_latency_us
    return machine.inter_gbps, machine.inter_latency_us


def memory_gib(s, layout, machine, state_bytes=16):
    """Per-GPU memory of `layout` on its fullest pipeline rank, the first or the last (the
    first holds the embeddings and, but in zero-bubble where every rank holds as many, the most
    microbatches alive; the last the head and the logits): {"state", "activations", "total",
    "fits", "params"} (GiB; params: the most parameters a rank holds). state_bytes per
    parameter: 16 for mixed-precision Adam (bf16 weights and gradients, fp32 master weights and
    two moments), 8 for fp32 SGD (weights and gradients)."""
    t, p, v = layout.tp, layout.pp, layout.virtual
    r, total = replica_settings(s, layout), p * v
    params = [sum(parameter_count(s, stage_layers(s.layers, st, total))
                  for st in stage_ids(rank, p, v)) / t for rank in range(p)]
    activations = {rank: activation_bytes(r, rank, p, t, layout.recompute) for rank in {0, p - 1}}
    held = {rank: params[rank] * state_bytes + (a or 0) for rank, a in activations.items()}
    worst = max(held, key=held.get)
    return {"state": params[worst] * state_bytes / 2**30,
            "activations": None if activations[worst] is None else activations[worst] / 2**30,
            "total": held[worst] / 2**30, "fits": held[worst] <= machine.usable
            * machine.memory_gib * 2**30, "params": max(params)}


def predict(s, layout, machine, state_bytes=16, compute_s=None, impl="manual", call_s=0.0):
    """Memory (memory_gib) and step time of `layout` training Settings `s` (its batch_size the
    global batch) on `machine`; compute_s(stage) -> (forward, backward) seconds of a
    microbatch's call, measured, in place of the FLOPs at the machine's rate; impl: the
    tensor parallelism's calls (tp_messages); call_s: what the pipeline schedule itself adds to
    each call (its Python, its messages' posting and waiting), measured."""
    t, p, d, v = layout.tp, layout.pp, layout.dp, layout.virtual
    if s.batch_size % (d * layout.microbatches):
        raise ValueError(f"{layout.describe()}: {d} replicas of {layout.microbatches} "
                         f"microbatches do not divide the batch of {s.batch_size}")
    memory = memory_gib(s, layout, machine, state_bytes)
    r = replica_settings(s, layout)
    batch, total = r.batch_size // layout.microbatches, p * v
    rate = machine.peak_tflops * 1e12 * machine.efficiency
    gbps, latency = link(machine, 1) if t <= machine.gpus_per_node else \
        (machine.inter_gbps, machine.inter_latency_us)
    cost, per_step = {}, {}
    for stage in range(total):
        layers = stage_layers(s.layers, stage, total)
        forward, backward = compute_s(stage) if compute_s else \
            (x / t / rate for x in compute.stage_flops(s, layers, batch))
        sent = [sum(collective_seconds(*c, t, gbps, latency, machine.call_latency_us)
                    for c in calls) for calls in tp_messages(r, layers, batch, t, impl)]
        f, b, per_step[stage] = forward + sent[0], backward + sent[1], sent[2]
        b += f if layout.recompute else 0
        cost.update({(kind, stage): pipeline.call_cost(kind, f, b, call_s if p > 1 else 0.0)
                     for kind in pipeline.KINDS})
    p2p_gbps, p2p_latency = link(machine, t * d)
    boundary = comm.boundary_elements(dataclasses.asdict(s))
    if machine.p2p_latency_us is not None:
        p2p_latency = machine.p2p_latency_us
    message = p2p_latency * 1e-6 + batch * max(boundary) \
        * comm.DTYPE_BYTES[s.dtype] / (p2p_gbps * 1e9) if p > 1 else 0.0
    m = layout.microbatches
    span = pipeline.long_span(r.schedule, p, m, v, lambda kind, stage: cost[kind, stage],
                              message)
    kinds = ("F", "I", "W") if r.schedule == "zero-bubble" else ("F", "B")
    busy = [m * sum(cost[kind, st] for kind in kinds for st in stage_ids(rank, p, v))
            for rank in range(p)]
    dp_gbps, dp_latency = link(machine, t) if t * d <= machine.gpus_per_node else \
        (machine.inter_gbps, machine.inter_latency_us)
    dp_s = collective_seconds("all_reduce", memory["params"] * comm.DTYPE_BYTES[s.dtype], d,
                              dp_gbps, dp_latency, machine.call_latency_us)
    optimizer_s = 2 * memory["params"] * state_bytes / (machine.memory_gbps * 1e9)
    # Each rank's SP gradient all_reduces, after its last backward, exposed.
    sp_s = max(sum(per_step[st] for st in stage_ids(rank, p, v)) for rank in range(p))
    step_s = span + sp_s + dp_s + optimizer_s
    flops = compute.flops_per_step(s)
    return {"layout": dataclasses.asdict(layout), "describe": layout.describe(),
            "microbatch_size": batch, "memory_gib": memory, "fits": memory["fits"],
            "time_s": {"step": step_s, "compute_and_tp": max(busy),
                       "pipeline_idle": span - max(busy), "sp_gradients": sp_s,
                       "dp_all_reduce": dp_s,
                       "optimizer": optimizer_s},
            "bubble": 1 - sum(busy) / len(busy) / span,
            "tflops_per_gpu": flops / step_s / (t * p * d) / 1e12,
            "mfu": flops / step_s / (t * p * d) / (machine.peak_tflops * 1e12)}


def activation_bytes(r, rank, p, t, recompute):
    """A pipeline rank's activations under replica settings r: the MLP's by
    memory.pipeline_activation_bytes (None under TP or recomputation, not counted), the gpt's
    by gpt_pipeline_bytes."""
    if r.model == "gpt":
        return gpt_pipeline_bytes(r, rank, p, t, recompute)
    return None if t > 1 or recompute else memory.pipeline_activation_bytes(r, rank, p)


@functools.lru_cache(maxsize=65536)
def gpt_pipeline_bytes(r, rank, p, t, recompute):
    """The gpt's chunks alive in the schedule's order times what a chunk saves (memory.py's
    count, to the byte; under zero-bubble a chunk's whole is taken as held until its weight
    gradient, which torch's split does not quite do: pipeline_activation_bytes); with
    recomputation each alive chunk's block inputs (the last stage's head and loss too) and one
    block whole."""
    v, total = r.virtual_stages, p * r.virtual_stages
    batch = r.batch_size // r.microbatches
    ops = pipeline.order(r.schedule, p, r.microbatches, v)[rank]
    if not recompute:
        return memory.chunks_alive_bytes(r, rank, p, t)
    split = t if r.sequence_parallel else 1
    block_input = batch * r.seq_len * r.hidden_dim * comm.DTYPE_BYTES[r.dtype] / split
    # The last stage also keeps its head's input and fp32 log-softmax until its backward.
    head = memory.gpt_activation_bytes(r, t, vocab_rows=-(-r.vocab_size // t), blocks=0,
                                       first=False, last=True, batch=batch)
    inputs = {st: len(stage_layers(r.layers, st, total)) * block_input
              + (head if st == total - 1 else 0) for st in stage_ids(rank, p, v)}
    whole = memory.gpt_activation_bytes(r, t, blocks=1, first=False, last=False, batch=batch)
    return pipeline.alive(ops, lambda kind, st: pipeline.chunks(kind, st) * inputs[st]) + whole
