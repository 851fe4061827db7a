"""One settings record and the command-line flags every driver shares.

The defaults are the lab handout's (`--batch-size 64 --input-dim 1024 --hidden-dim 2048
--num-classes 10 --steps 5`), so its commands run unchanged with `src` -> `partlab`.
"""
import argparse
import dataclasses


class UsageError(Exception):
    """A mistake in how partlab was launched; reported as one line, exit status 2."""


def require(condition, message):
    """Raise UsageError(message) unless condition holds: a check with its fix in the message."""
    if not condition:
        raise UsageError(message)


@dataclasses.dataclass(frozen=True)
class Settings:
    model: str = "mlp"
    batch_size: int = 64
    hidden_dim: int = 2048
    steps: int = 5
    layers: int | None = None      # None: the driver's default (partition.default_layers)
    # --model mlp only
    input_dim: int = 1024
    num_classes: int = 10
    activation: str = "relu"
    # --model gpt only
    heads: int = 4
    seq_len: int = 32
    vocab_size: int = 64
    sequence_parallel: bool = False     # tensor-parallel drivers only
    lr: float = 0.002
    optimizer: str = "sgd"
    momentum: float = 0.0               # SGD's
    seed: int = 0
    dtype: str = "fp32"
    device: str = "auto"
    json: str | None = None
    timeout: float = 180.0
    check: bool = False
    # checkpoints (partlab/checkpoint.py)
    checkpoint_dir: str | None = None
    checkpoint_every: int | None = None  # None: at the last step only
    keep_checkpoints: int = 2
    resume: bool = False
    # pipeline only
    microbatches: int | None = None  # None: partition.default_microbatches
    schedule: str = "gpipe"
    stages: int | None = None
    virtual_stages: int | None = None
    timeline: str | None = None
    # pipeline x tensor parallel only (None elsewhere)
    tp: int | None = None
    tp_impl: str | None = None
    # manual TP only
    fused: bool = True

    def with_default_layers(self, layers):
        """These settings with --layers filled in where the user gave none."""
        return self if self.layers is not None else dataclasses.replace(self, layers=layers)


DEFAULTS = Settings()
# Each model's own flags, and what the other model's defaults become with --model gpt (a size
# that trains every strategy on 2 CPU cores in seconds, and an SGD rate at which it learns).
MODEL_FLAGS = {"mlp": ("input_dim", "num_classes", "activation"),
               "gpt": ("heads", "seq_len", "vocab_size", "sequence_parallel")}
GPT_DEFAULTS = {"batch_size": 16, "hidden_dim": 64, "lr": 1.0}
ADAMW_LR = 1e-3


def default_lr(model, optimizer="sgd"):
    if optimizer == "adamw":
        return ADAMW_LR
    return GPT_DEFAULTS["lr"] if model == "gpt" else DEFAULTS.lr


def make_parser(prog, description):
    """The shared flags; a driver adds its own (pipeline: --microbatches, --schedule, --stages)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    d = DEFAULTS
    # A model's own flags and the sizes that differ by model default to None here, so that parse
    # can tell a flag given from one left alone.
    p.add_argument("--model", choices=("mlp", "gpt"), default=d.model,
                   help="mlp: the handout's MLP; gpt: a small decoder-only transformer")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"samples per step (default {d.batch_size}; gpt "
                        f"{GPT_DEFAULTS['batch_size']} sequences)")
    p.add_argument("--hidden-dim", type=int, default=None,
                   help=f"width of hidden layers (default {d.hidden_dim}; gpt "
                        f"{GPT_DEFAULTS['hidden_dim']})")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps (SGD)")
    p.add_argument("--layers", type=int, default=d.layers,
                   help="linear layers in the MLP, blocks in the gpt (default 2, the handout's "
                        "MLP, or one per pipeline stage when there are more stages; TP needs an "
                        "even count of MLP layers)")
    p.add_argument("--input-dim", type=int, default=None,
                   help=f"mlp: features per sample (default {d.input_dim})")
    p.add_argument("--num-classes", type=int, default=None,
                   help=f"mlp: output classes (default {d.num_classes})")
    p.add_argument("--activation", choices=("relu", "gelu"), default=None,
                   help="mlp: activation after every layer but the last (default relu; gelu: "
                        "tanh approximation)")
    p.add_argument("--heads", type=int, default=None,
                   help=f"gpt: attention heads (default {d.heads})")
    p.add_argument("--seq-len", type=int, default=None,
                   help=f"gpt: tokens per sequence (default {d.seq_len})")
    p.add_argument("--vocab-size", type=int, default=None,
                   help=f"gpt: vocabulary (default {d.vocab_size})")
    p.add_argument("--sequence-parallel", action="store_true", default=None,
                   help="gpt with tensor parallelism: split the norms' and residuals' "
                        "activations along the sequence (all_gather / reduce_scatter)")
    p.add_argument("--lr", type=float, default=None,
                   help=f"learning rate (default: SGD {d.lr}, gpt {GPT_DEFAULTS['lr']}; "
                        f"AdamW {ADAMW_LR})")
    p.add_argument("--optimizer", choices=("sgd", "adamw"), default=d.optimizer,
                   help="sgd (with --momentum) or adamw (torch's defaults but the rate)")
    p.add_argument("--momentum", type=float, default=d.momentum, help="SGD's momentum")
    p.add_argument("--checkpoint-dir", metavar="DIR", default=None,
                   help="save checkpoints here (DIR/step-N, any layout loads them)")
    p.add_argument("--checkpoint-every", type=int, metavar="N", default=None,
                   help="save every N steps (default: after the last step only)")
    p.add_argument("--keep-checkpoints", type=int, metavar="K", default=d.keep_checkpoints,
                   help="keep the newest K checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in --checkpoint-dir "
                        "(--steps counts the whole run)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for weights and synthetic data")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default=d.dtype,
                   help="parameter and activation dtype")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=d.device,
                   help="auto: one GPU per process with NCCL when there are enough, else CPU+gloo")
    p.add_argument("--json", metavar="PATH", default=d.json,
                   help="rank 0 writes the run's result record here")
    p.add_argument("--timeout", type=float, default=d.timeout, metavar="SECONDS",
                   help="a collective that waits longer than this fails instead of hanging")
    p.add_argument("--check", action="store_true",
                   help="exit 1 when the run deviates from the reference beyond the tolerance")
    return p


# Schedules with several stages per process (--virtual-stages, default 2).
INTERLEAVED = ("interleaved-1f1b", "zero-bubble")


def add_pipeline_flags(p):
    d = DEFAULTS
    p.add_argument("--microbatches", type=int, default=d.microbatches,
                   help="microbatches per step (the batch is split into this many; default 4, "
                        "or as many as the schedule needs on more pipeline ranks)")
    p.add_argument("--schedule", choices=("gpipe", "1f1b") + INTERLEAVED, default=d.schedule,
                   help="pipeline schedule (see partlab/pipeline.py)")
    p.add_argument("--stages", type=int, default=None,
                   help="pipeline ranks; must equal the processes in the pipeline dimension "
                        "(default: that)")
    p.add_argument("--virtual-stages", type=int, default=None, metavar="V",
                   help="model chunks per pipeline rank (default 2 for the interleaved "
                        "schedules, else 1)")
    p.add_argument("--timeline", metavar="PREFIX", default=d.timeline,
                   help="write PREFIX.png (Gantt chart of the last timed step, a row per "
                        "rank) and PREFIX.json (Chrome trace of every step)")


def parse(parser, argv=None):
    """Parse argv into Settings and check what needs no knowledge of the process group."""
    args = vars(parser.parse_args(argv))
    other = "gpt" if args["model"] == "mlp" else "mlp"
    for flag in MODEL_FLAGS[other]:
        require(args[flag] is None, f"--{flag.replace('_', '-')} is a --model {other} flag: "
                                    f"drop it, or add --model {other}")
    defaults = {**(GPT_DEFAULTS if args["model"] == "gpt" else {}),
                "lr": default_lr(args["model"], args["optimizer"])}
    s = Settings(**{k: v if v is not None else defaults.get(k, getattr(DEFAULTS, k))
                    for k, v in args.items()})
    if s.virtual_stages is None:
        s = dataclasses.replace(s, virtual_stages=2 if s.schedule in INTERLEAVED else 1)
    require(s.virtual_stages == 1 or s.schedule in INTERLEAVED,
            f"--virtual-stages {s.virtual_stages} needs an interleaved schedule: "
            f"--schedule {' or '.join(INTERLEAVED)}")
    for flag in ("batch_size", "input_dim", "hidden_dim", "num_classes", "steps", "layers",
                 "microbatches", "virtual_stages", "tp", "heads", "seq_len", "vocab_size"):
        require(getattr(s, flag) is None or getattr(s, flag) >= 1,
                f"--{flag.replace('_', '-')} must be at least 1 (got {getattr(s, flag)})")
    require(s.num_classes >= 2, f"--num-classes must be at least 2 (got {s.num_classes})")
    require(s.model != "gpt" or s.hidden_dim % s.heads == 0,
            f"--hidden-dim {s.hidden_dim} is not divisible by --heads {s.heads}: each head gets "
            f"hidden/heads features; use a multiple of {s.heads}")
    require(s.lr > 0, f"--lr must be positive (got {s.lr})")
    require(0 <= s.momentum < 1, f"--momentum must be in [0, 1) (got {s.momentum})")
    require(s.momentum == 0 or s.optimizer == "sgd",
            "--momentum is SGD's: AdamW keeps its own moments; drop --momentum")
    for flag, given in (("--checkpoint-every", s.checkpoint_every is not None),
                        ("--keep-checkpoints", s.keep_checkpoints != DEFAULTS.keep_checkpoints),
                        ("--resume", s.resume)):
        require(not given or s.checkpoint_dir, f"{flag} needs --checkpoint-dir DIR")
    require(s.checkpoint_every is None or s.checkpoint_every >= 1,
            f"--checkpoint-every must be at least 1 (got {s.checkpoint_every})")
    require(s.keep_checkpoints >= 1,
            f"--keep-checkpoints must be at least 1 (got {s.keep_checkpoints})")
    require(s.timeout > 0, f"--timeout must be positive (got {s.timeout})")
    return s
