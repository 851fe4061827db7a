"""Activation memory: the bytes autograd saves for backward, counted tensor by tensor as the CPU
kernels save them (partlab/counters.py's ActivationMeter measures the same, and the tests hold
the two equal to the byte), for the MLP and the gpt, a tensor-parallel rank (with and without
sequence parallelism) and a pipeline rank (its stages' microbatches alive at once).

Settings here are partlab.config.Settings; `tokens` or `batch` is what one call sees (a whole
step's batch, or a pipeline microbatch).
"""
from partlab.model import mlp_dims, parameter_count
from partlab.partition import stage_ids, stage_layers
from partlab.theory import pipeline
from partlab.theory.comm import DTYPE_BYTES

LOSS_BYTES = 4   # the loss's log-softmax is fp32 whatever the run's dtype
INDEX_BYTES = 8  # int64 tokens, targets and positions


def mlp_saved(s, layers, batch):
    """What the MLP's `layers` (a consecutive range) save for `batch` samples, in the parts that
    zero-bubble's split backward frees at different times (pipeline_activation_bytes): each
    linear its input; ReLU its output, the next linear's input too ("shared", but for the last
    layer's); GELU its input; the model's last layer's loss its fp32 log-softmax, the int64
    targets and a total weight. "tail": what the activation after the range's last linear
    saves; "rest": everything else but the loss."""
    dims, size, last, end = mlp_dims(s), DTYPE_BYTES[s.dtype], s.layers - 1, layers[-1]
    relu = s.activation == "relu"
    shared = sum(dims[i + 1] for i in layers if relu and i < end)
    tail = dims[end + 1] if end < last else 0
    rest = sum(dims[i] for i in layers) - shared \
        + sum(dims[i + 1] for i in layers if not relu and i < end)
    return {"rest": batch * size * rest, "tail": batch * size * tail,
            "shared": batch * size * shared,
            "loss": (LOSS_BYTES * s.num_classes + INDEX_BYTES) * batch + LOSS_BYTES
            if end == last else 0}


def mlp_activation_bytes(s, layers, batch):
    return sum(mlp_saved(s, layers, batch).values())


def gpt_activation_bytes(s, tp=1, vocab_rows=None, blocks=None, first=True, last=True,
                         batch=None):
    """Bytes a rank of the gpt saves: `blocks` blocks (default all), the embedding when `first`,
    the final norm, head and loss when `last`, for `batch` sequences (default --batch-size).

    Per block and token, with t tensor-parallel ranks and h the width, a the heads, in the run's
    dtype:
      norms         ln1's and ln2's inputs and their mean and 1/std: 2h + 4   (/t under SP)
      column inputs qkv's and fc's (the norms' outputs, whole on every rank): 2h
      TP-sharded    q, k and v (3h), attention's output (h, also proj's input), fc's output
                    before GELU and after (4h + 4h): 12h / t
    and the attention's logsumexp, a / t in fp32. The embedding keeps the int64 tokens and the
    sequence's positions; the last stage the final norm (h + 2, /t under SP), the head's input
    (h), the fp32 log-softmax of this rank's vocab_rows logits, the int64 targets and
    cross-entropy's fp32 total weight. On CUDA, LayerNorm's statistics are fp32 and fused
    attention may pad its logsumexp: not counted.

    Korthikanti et al. 2022 count 34 s b h + 5 a s^2 b bytes a layer (fp16, with dropout and its
    masks, the s x s attention scores stored); here fused attention keeps the logsumexp instead
    of the scores, and there is no dropout. Their sequence parallelism also divides the column
    inputs by t (the all_gather is redone in backward); partlab keeps them whole, so SP saves
    (2h + 4)(1 - 1/t) a block's token. Manual TP saves two bool ownership masks (the
    embedding's and the loss's), a byte a token each, and its own loss no total weight.
    """
    b = s.batch_size if batch is None else batch
    h, size = s.hidden_dim, DTYPE_BYTES[s.dtype]
    split = tp if s.sequence_parallel else 1
    rows = s.vocab_size if vocab_rows is None else vocab_rows
    block = size * ((2 * h + 4) / split + 2 * h + 12 * h / tp) + LOSS_BYTES * s.heads / tp
    per_token = (s.layers if blocks is None else blocks) * block
    fixed = 0
    if first:
        per_token += INDEX_BYTES
        fixed += INDEX_BYTES * s.seq_len
    if last:
        per_token += size * ((h + 2) / split + h) + LOSS_BYTES * rows + INDEX_BYTES
        fixed += LOSS_BYTES
    return round(b * s.seq_len * per_token) + fixed


def tp_activation_bytes(s, tp, params):
    """A tensor-parallel rank holding `params` (reference names, its shards): the gpt's count;
    None for the MLP, whose column/row pairs partlab does not count."""
    if s.model != "gpt":
        return None
    return gpt_activation_bytes(s, tp, vocab_rows=params["head.weight"].shape[0])


def stage_activation_bytes(s, stage, stages, tp=1):
    """What pipeline stage `stage` of `stages` saves for one microbatch; tp > 1: a gpt stage's
    tensor-parallel rank (the vocabulary padded to a multiple of tp), None for an MLP's."""
    layers, batch = stage_layers(s.layers, stage, stages), s.batch_size // s.microbatches
    if s.model == "gpt":
        return gpt_activation_bytes(s, tp, vocab_rows=-(-s.vocab_size // tp),
                                    blocks=len(layers), first=stage == 0,
                                    last=stage == stages - 1, batch=batch)
    return mlp_activation_bytes(s, layers, batch) if tp == 1 else None


def chunks_alive_bytes(s, rank, ranks, tp=1):
    """Pipeline rank `rank`'s peak when each chunk keeps what its stage saves (tp > 1: a gpt
    stage's tensor-parallel rank) from its forward until its backward or weight gradient."""
    v = s.virtual_stages or 1
    whole = {st: stage_activation_bytes(s, st, ranks * v, tp) for st in stage_ids(rank, ranks, v)}
    return pipeline.alive(pipeline.order(s.schedule, ranks, s.microbatches, v)[rank],
                          lambda kind, st: pipeline.chunks(kind, st) * whole[st])


def pipeline_activation_bytes(s, rank, ranks):
    """Pipeline rank `rank`'s peak: its stages' microbatches alive at once in the schedule's
    order (theory.pipeline.alive), each weighing what its stage saves; None where partlab has no
    count (the gpt under zero-bubble; stages that are also tensor-parallel are not counted).

    Zero-bubble's split backward, as measured (tests/test_drivers.py): the input gradient (I)
    frees what the activation after the stage's last linear saved, the weight gradient (W) the
    rest (mlp_saved); a ReLU output that the next linear saved too stays until the step ends,
    as does the last stage's fp32 log-softmax, computed at I (the graph I retained for W goes
    with the step's state). The first stage's input is data: its I has nothing to compute and
    its W frees everything. Not counted: GELU and the gpt, where W leaves more behind on the
    last stage by rules partlab has not pinned down."""
    if s.schedule != "zero-bubble":
        return chunks_alive_bytes(s, rank, ranks)
    if s.model == "gpt" or s.activation != "relu":
        return None
    v, total = s.virtual_stages or 1, ranks * (s.virtual_stages or 1)
    ops = pipeline.order(s.schedule, ranks, s.microbatches, v)[rank]
    whole = {st: stage_activation_bytes(s, st, total) for st in stage_ids(rank, ranks, v)}
    batch = s.batch_size // s.microbatches
    saved = {st: mlp_saved(s, stage_layers(s.layers, st, total), batch) for st in whole}
    log_softmax = LOSS_BYTES * s.num_classes * batch

    def change(kind, st):
        part = saved[st]
        if kind == "F":
            return whole[st] - part["loss"]
        if st == 0:   # its input is data: I has nothing to do, W is the whole backward
            return -whole[st] if kind == "W" else 0
        if kind == "I":   # (the loss's targets and total weight live only during the call)
            return -part["tail"] + log_softmax * bool(part["loss"]), part["loss"]
        return -part["rest"]
    return pipeline.alive(ops, change)


def bytes_needed(s):
    """A lower bound on what one process holds: the full model built from the seed in fp32
    (every rank builds it before keeping its slice) and the reference's weights and gradients,
    plus one step's activations of the reference. Used to refuse a size before allocating it."""
    activations = gpt_activation_bytes(s) if s.model == "gpt" else \
        mlp_activation_bytes(s, range(s.layers), s.batch_size)
    return 4 * 3 * parameter_count(s) + 2 * activations
