"""FLOPs: the maths a model needs, whatever the layout (the lab's MFU), and what each pipeline
stage computes forward and backward (`partlab plan`'s compute time)."""
from partlab.model import mlp_dims


def stage_flops(s, layers, batch):
    """(forward, backward) FLOPs of the model's `layers` (a consecutive range of MLP layers or
    gpt blocks) for `batch` samples: every matmul's 2 m n k forward, twice that backward (its
    input's and its weight's gradient), but the MLP's first layer, whose input is data and needs
    no gradient. The gpt's last block brings the LM head (2 h vocab a token); its attention's
    own matmuls (q k^T and the weights times v) are 2 x 2 s^2 h a sequence and block forward,
    causal masking computing them whole."""
    if s.model == "gpt":
        tokens, h = batch * s.seq_len, s.hidden_dim
        forward = len(layers) * (2 * tokens * 12 * h * h + 4 * batch * s.seq_len ** 2 * h)
        if layers[-1] == s.layers - 1:
            forward += 2 * tokens * h * s.vocab_size
        return forward, 2 * forward
    dims = mlp_dims(s)
    forward = sum(2 * batch * dims[i] * dims[i + 1] for i in layers)
    return forward, 2 * forward - (2 * batch * dims[0] * dims[1] if layers[0] == 0 else 0)


def flops_per_step(s):
    """One training step's model FLOPs of Settings `s`: every layer's, forward and backward."""
    return sum(stage_flops(s, range(s.layers), s.batch_size))


def attention_flops(s):
    """One step's FLOPs of the gpt's attention matmuls, forward and backward (what torch's
    FlopCounterMode does not see inside fused attention)."""
    return 3 * s.layers * 4 * s.batch_size * s.seq_len ** 2 * s.hidden_dim
