"""What each layout must communicate per step, from the model's sizes alone: the analytic side
that `partlab bench comm` and the tests put next to what the drivers count.

Every function takes a record's settings (a dict) and returns {op: {"count", "bytes"}} for one
rank, the bytes being the payload the rank hands to each op (what partlab/counters.py counts).
"""
from partlab.model import DTYPES
from partlab.partition import stage_ids, stage_layers

LOSS_BYTES = 4   # the vocabulary-parallel loss reduces fp32 numbers whatever the run's dtype
DTYPE_BYTES = {name: dtype.itemsize for name, dtype in DTYPES.items()}


def dtype_bytes(s):
    return DTYPE_BYTES[s["dtype"]]


def boundary_elements(s):
    """Elements per sample entering each layer (MLP) or block (gpt): where a pipeline cuts."""
    if s["model"] == "gpt":
        return [s["seq_len"] * s["hidden_dim"]] * s["layers"]
    return [s["input_dim"]] + [s["hidden_dim"]] * (s["layers"] - 1) + [s["num_classes"]]


def tp_comm(s, ways, impl):
    """One rank of `ways` tensor-parallel ranks of `impl` ("native" or "manual"; they differ
    only in the gpt's sequence parallelism): the MLP's or the gpt's count."""
    return gpt_tp_comm(s, ways, impl) if s["model"] == "gpt" else mlp_tp_comm(s)


def mlp_tp_comm(s):
    """With L layers there are L/2 column/row pairs. Forward: one all_reduce per pair of the row
    layer's output, B x out. Backward: one per pair but the first (the model's input needs no
    gradient) of the column layer's input gradient, B x in. Every rank reduces the whole tensor,
    so the payload does not depend on the number of ranks; what travels does (ring_wire_bytes).
    """
    dims, pairs = boundary_elements(s), range(0, s["layers"], 2)
    elements = ([s["batch_size"] * dims[i + 2] for i in pairs]
                + [s["batch_size"] * dims[i] for i in pairs if i > 0])
    return {"all_reduce": {"count": len(elements), "bytes": sum(elements) * dtype_bytes(s)}}


def gpt_tp_comm(s, t, impl):
    """Megatron-LM's count for L blocks of T tokens, width h, on t ranks.

    Without SP, all_reduces of [T, h]: the embedding's; per block 2 forward (attention's and
    the MLP's outputs) and 2 backward (their inputs' gradients); the LM head's input gradient;
    and the loss's 3 of [T] (max, sum of exponentials, target logit).
    With SP each block's all_reduce is a reduce_scatter ([T, h] in) plus an all_gather ([T/t, h]
    in): all_gather 4L + 2 (the head's input forward, the embeddings' split backward),
    reduce_scatter 4L + 1 (the head's input gradient). The embedding and the loss keep their
    all_reduces, and the gradients of the 4L + 2 norm parameters (summed over the sequence)
    add one each; manual TP sums its 2L row biases' too, where DTensor adds each bias before
    its reduce_scatter, where the gradient is already whole.
    """
    blocks, tokens, h, size = s["layers"], s["batch_size"] * s["seq_len"], s["hidden_dim"], \
        dtype_bytes(s)
    loss = {"count": 3, "bytes": 3 * tokens * LOSS_BYTES}
    if not s["sequence_parallel"]:
        count = 2 + 4 * blocks
        return {"all_reduce": {"count": count + loss["count"],
                               "bytes": count * tokens * h * size + loss["bytes"]}}
    vectors = 4 * blocks + 2 + (2 * blocks if impl == "manual" else 0)
    return {"all_gather": {"count": 4 * blocks + 2, "bytes": (4 * blocks + 2) * tokens // t * h
                           * size},
            "reduce_scatter": {"count": 4 * blocks + 1, "bytes": (4 * blocks + 1) * tokens * h
                               * size},
            "all_reduce": {"count": 1 + vectors + loss["count"],
                           "bytes": (tokens + vectors) * h * size + loss["bytes"]}}


def ring_wire_bytes(op, payload, ranks):
    """What one rank sends in a ring collective of `payload` bytes (what it hands to the op),
    or point to point: all_reduce is a reduce_scatter and an all_gather, each t-1 messages of
    payload/t, so 2(t-1)/t x payload; an all_gather passes on its t-1 other shards, (t-1) x
    payload; a send sends its payload, a recv nothing. None for an op not modelled here."""
    share = {"all_reduce": 2 * (ranks - 1) / ranks, "reduce_scatter": (ranks - 1) / ranks,
             "all_gather": ranks - 1, "send": 1, "recv": 0}.get(op)
    return None if share is None else share * payload


def pipeline_comm(s, rank, ranks):
    """Pipeline rank `rank` of `ranks`.

    Each microbatch crosses each stage boundary once forward (its activation) and once backward
    (that activation's gradient): (B/m) x boundary_elements elements each way. So for each
    stage the rank holds, it sends m messages to each neighbour stage and receives m from each.
    """
    m, v, dims = s["microbatches"], s["virtual_stages"] or 1, boundary_elements(s)
    total = ranks * v
    elements = [s["batch_size"] // m * dims[stage_layers(s["layers"], max(a, b), total)[0]]
                for a in stage_ids(rank, ranks, v) for b in (a - 1, a + 1) if 0 <= b < total]
    one_way = {"count": m * len(elements), "bytes": m * sum(elements) * dtype_bytes(s)}
    return {"send": one_way, "recv": dict(one_way)}


def run_comm(record, rank):
    """What rank `rank` of a tensor-parallel or pipeline run (a record, partlab/report.py's
    Record as JSON) should communicate per step: pipeline_comm or tp_comm."""
    s = record["settings"]
    if record["pipeline_ranks"]:
        return pipeline_comm(s, rank, record["pipeline_ranks"])
    return tp_comm(s, record["world_size"], tp_impl(record))


def tp_impl(record):
    """A run's tensor parallelism: "manual" (tp_layers.py's by hand) or "native" (DTensor)."""
    return "manual" if "manual" in record["strategy"] else "native"
