"""How the model is cut, for every strategy: the column/row plan of tensor parallelism, the slice
of each reference parameter that a rank holds, the layers each pipeline stage owns, and the rules
that a layout must satisfy (checked before any process group exists).

Tensor parallelism pairs layers (Megatron-LM, Shoeybi et al. 2019): layer 0, 2, ... is
column-parallel (weight rows and bias split: each rank owns hidden/t outputs), layer 1, 3, ...
row-parallel (weight columns split, bias replicated: each rank owns a partial sum). Pipeline stages
own contiguous layers; rank r of p holds stages r, r+p, ... (the interleaved placement).
"""
import dataclasses
import sys

from partlab.config import INTERLEAVED, require
from partlab.theory.pipeline import equal_stages, equal_stages_text


def layer_index(name):
    """'layers.3.weight' -> 3."""
    return int(name.split(".")[1])


def is_column_parallel(name):
    """Even layers are column-parallel, odd layers row-parallel."""
    return layer_index(name) % 2 == 0


# The gpt's tensor-parallel split by parameter name (Megatron-LM): vocabulary rows (padded to a
# multiple of the ranks), column-parallel rows (whole heads: gpt.Attention's qkv layout) and
# row-parallel columns; everything else (norms, position embedding, row biases) replicated.
GPT_VOCAB, GPT_COLUMN, GPT_ROW = ("tok.weight", "head.weight"), (".qkv.", ".fc."), ".proj.weight"


def vocab_shard(vocab_size, ways):
    """Rows of the vocabulary each rank holds: ceil(vocab / ways); the last ranks' rows are
    padding where the vocabulary runs out (9 on 4 ranks: 3, 3, 3 and 3 of padding)."""
    return -(-vocab_size // ways)


def tp_dim(name):
    """The dimension along which tensor parallelism splits the parameter `name` (and its
    optimizer state), None where every rank holds it whole."""
    if name.startswith("layers."):
        if is_column_parallel(name):
            return 0                               # weight rows and bias: this rank's outputs
        return 1 if name.endswith("weight") else None   # weight columns; the bias replicated
    if name in GPT_VOCAB or any(part in name for part in GPT_COLUMN):
        return 0
    return 1 if name.endswith(GPT_ROW) else None


def tp_slice(name, full, rank, ways):
    """Tensor-parallel rank `rank`'s part of the reference parameter `full` called `name`."""
    dim = tp_dim(name)
    if dim is None:
        return full
    if name in GPT_VOCAB:
        rows = vocab_shard(full.shape[0], ways)
        padded = full.new_zeros(rows * ways, full.shape[1])
        padded[:full.shape[0]] = full
        return padded[rank * rows:(rank + 1) * rows]
    return full.chunk(ways, dim=dim)[rank]


def dtensor_plan(model, sequence_parallel=False):
    """The same plan in DTensor's terms, for parallelize_module: one all_reduce per pair.

    The gpt (Megatron-LM's split): the qkv linear column-parallel, so each rank holds whole heads;
    the attention's output projection and the MLP's second linear row-parallel; the token
    embedding split by vocabulary rows (each rank looks up its own rows, zeros elsewhere, one
    all_reduce); the LM head column-parallel with its logits left sharded by vocabulary, for
    loss_parallel's cross-entropy (never gathered). Norms and the position embedding are
    replicated. DTensor is imported here, not above, so that manual TP never loads it.

    With sequence_parallel (the gpt's), the residual stream between the TP regions is split
    along the sequence, Shard(1): the norms are SequenceParallel, each column layer gathers its
    input (all_gather; reduce_scatter of the gradient), each row layer reduce_scatters its
    output, and the embeddings' sum is split along the sequence as it enters the first block."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        RowwiseParallel,
        SequenceParallel,
    )

    if not hasattr(model, "blocks"):
        return {f"layers.{name}": ColwiseParallel() if int(name) % 2 == 0 else RowwiseParallel()
                for name in model.layers}
    sharded = {"input_layouts": Shard(1)} if sequence_parallel else {}
    column, row = ColwiseParallel(**sharded), \
        RowwiseParallel(**({"output_layouts": Shard(1)} if sequence_parallel else {}))
    plan = {"tok": RowwiseParallel(input_layouts=Replicate()),
            "head": ColwiseParallel(**sharded, output_layouts=Shard(-1), use_local_output=False)}
    if sequence_parallel:
        plan["ln_f"] = SequenceParallel()
        if model.tok is not None:
            plan[f"blocks.{next(iter(model.blocks))}"] = PrepareModuleInput(
                input_layouts=(Replicate(),), desired_input_layouts=(Shard(1),),
                use_local_output=True)
    plan = {name: style for name, style in plan.items()      # a pipeline stage may lack them
            if getattr(model, name.split(".")[0]) is not None}
    for name in model.blocks:
        plan |= {f"blocks.{name}.attn.qkv": column, f"blocks.{name}.fc": column,
                 f"blocks.{name}.attn.proj": row, f"blocks.{name}.proj": row}
        if sequence_parallel:
            plan |= {f"blocks.{name}.ln1": SequenceParallel(),
                     f"blocks.{name}.ln2": SequenceParallel()}
    return plan


def dtensor_shards(params, mesh):
    """Parameters, some DTensors -> ({name: this rank's part}, reference_slice(name, full)): the
    reference sharded with each DTensor's own placements, plain parameters whole.
    src_data_rank=None slices locally instead of scattering from rank 0, so this is no
    collective."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    def reference_slice(name, full):
        if not isinstance(params[name], DTensor):
            return full
        return distribute_tensor(full, mesh, params[name].placements, src_data_rank=None).to_local()

    return {n: p.to_local() if isinstance(p, DTensor) else p for n, p in params.items()}, \
        reference_slice


def stage_layers(num_layers, stage, num_stages, unit=1):
    """The layers stage `stage` owns: an even, contiguous share of the model's units (single
    layers, or column/row pairs when the stage is also tensor-parallel)."""
    units = num_layers // unit
    return range(stage * units // num_stages * unit, (stage + 1) * units // num_stages * unit)


def stage_ids(rank, ranks, virtual_stages):
    """The stages pipeline rank `rank` holds: r, r+p, r+2p, ... (the interleaved placement)."""
    return [rank + k * ranks for k in range(virtual_stages)]


def default_layers(settings, pipeline_ranks=1, unit=1):
    """--layers when the user gave none: the handout's 2, or enough for every stage to own a unit
    (a layer; a column/row pair when the stages are tensor-parallel), so the handout's commands
    run on any number of processes."""
    return max(2, pipeline_ranks * (settings.virtual_stages or 1) * unit)


def default_microbatches(settings, ranks):
    """--microbatches when the user gave none: the handout's 4, or as many as the schedule wants
    on `ranks` pipeline ranks (one per rank; the interleaved schedules a multiple of them), the
    smallest such count that divides --batch-size. Where none does, GPipe and the interleaved
    schedules take fewer than the ranks (the largest count below them that divides the batch:
    they run, with warn_about_bubble's warning); 1F1B cannot."""
    b, rounds = settings.batch_size, settings.schedule in INTERLEAVED
    want = min(4, b)
    start = ranks * -(-want // ranks) if rounds else max(want, ranks)
    for m in range(start, b + 1, ranks if rounds else 1):
        if b % m == 0:
            return m
    require(settings.schedule != "1f1b",
            f"--schedule 1f1b needs at least one microbatch per stage ({ranks}), but --batch-size "
            f"{b} has fewer samples: use --batch-size {ranks * 4} or more")
    return max(m for m in range(1, min(ranks, b + 1)) if b % m == 0)


def pipeline_defaults(settings, ranks, unit=1):
    """The settings with --layers and --microbatches filled in for `ranks` pipeline ranks."""
    settings = settings.with_default_layers(default_layers(settings, ranks, unit))
    if settings.microbatches is None:
        settings = dataclasses.replace(settings, microbatches=default_microbatches(settings, ranks))
    return settings


def check_tensor_parallel(settings, ways, ways_flag="--nproc_per_node", native=False):
    """What a tensor-parallel model needs: a width that divides, and whole column/row pairs
    (MLP) or whole heads on every rank (gpt); native: DTensor's vocabulary split (torch.chunk's:
    ceil(vocab/t) rows a rank) must leave every rank a row, where manual TP pads."""
    if settings.model == "gpt":
        rows = vocab_shard(settings.vocab_size, ways)
        require(not native or rows * (ways - 1) < settings.vocab_size,
                f"--vocab-size {settings.vocab_size} on {ways} processes leaves the last rank no "
                f"rows of DTensor's split ({rows} a rank): use a vocabulary above "
                f"{rows * (ways - 1)}, or manual TP, which pads it")
        require(settings.heads % ways == 0,
                f"--heads {settings.heads} is not divisible by {ways} processes: each rank "
                f"holds whole heads; use a multiple of {ways} or change {ways_flag}")
        require(not settings.sequence_parallel or settings.seq_len % ways == 0,
                f"--seq-len {settings.seq_len} is not divisible by {ways} processes: sequence "
                f"parallelism splits the sequence; use a multiple of {ways}")
        return
    require(settings.layers % 2 == 0,
            f"--layers {settings.layers}: tensor parallelism pairs a column- with a row-parallel "
            "layer, so use an even number of layers")
    require(settings.hidden_dim % ways == 0,
            f"--hidden-dim {settings.hidden_dim} is not divisible by {ways} processes: "
            f"use a multiple of {ways} or change {ways_flag}")


def check_pipeline(settings, ranks, unit=1, processes_per_rank=1):
    """What any pipeline needs: a unit per stage, whole microbatches, and the schedule's own
    constraints. ranks: pipeline ranks, each of processes_per_rank processes (the 2-D mode's
    --tp)."""
    p, m, v = ranks, settings.microbatches, settings.virtual_stages
    require(settings.stages in (None, p),
            f"--stages {settings.stages} but {p} pipeline ranks: --stages must equal them, so "
            f"run {(settings.stages or p) * processes_per_rank} processes "
            "(torchrun --nproc_per_node)")
    require(settings.layers // unit >= p * v,
            f"--layers {settings.layers} cannot make {p * v} stages ({p} ranks x {v} virtual "
            f"stages) of at least {unit} layer(s): use --layers {p * v * unit} or more")
    require(settings.batch_size % m == 0,
            f"--batch-size {settings.batch_size} is not divisible by --microbatches {m}: "
            f"use a multiple of {m}")
    require(settings.schedule != "1f1b" or m >= p,
            f"--schedule 1f1b needs --microbatches >= stages ({m} < {p}): raise --microbatches")
    require(settings.schedule not in INTERLEAVED or m < p or m % p == 0,
            f"--schedule {settings.schedule} runs microbatches in rounds of {p}: use "
            f"--microbatches {p * max(1, m // p)} (a multiple of {p}) or fewer than {p}")


def warn_about_bubble(settings, ranks, local_rank):
    """Fewer microbatches than stages is allowed but mostly idle: say so, once per node."""
    p, m, v = ranks, settings.microbatches, settings.virtual_stages
    if m < p and local_rank == 0:
        print(f"partlab: warning: --microbatches {m} < {p} stages: each stage idles for "
              f"{equal_stages(settings.schedule, p, m, v):.0%} of a step (the bubble for equal "
              f"stages, {equal_stages_text(settings.schedule, p, m)}); "
              f"use --microbatches {p} or more", file=sys.stderr, flush=True)
