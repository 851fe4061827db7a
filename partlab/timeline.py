"""A pipeline's timeline: when each rank ran each microbatch's forward and backward, the bubble
measured from it, and two pictures of it (a Gantt chart PNG and a Chrome trace JSON).

The stage's own compute calls are timed (PipelineStage.forward_one_chunk, backward_one_chunk and,
for zero-bubble, backward_weight_one_chunk), so the bars are compute; the gaps between them are
the bubble plus waiting for neighbours' messages. Ranks' clocks are aligned by one barrier
before the first step. On CPU a call returns when its work is done, so the host's clock times
it; on a GPU it returns once its kernels are queued, so CUDA events recorded on the stream before
and after it time the kernels instead, read once the step has synchronized (`read`).

Bubble of a step = per rank, the share of the step's span (first bar on any rank to last bar on
any rank) in which the rank computes nothing; averaged over ranks. (The last stage's loss is
computed between its calls, so it counts as idle: microseconds per microbatch.) With equal
stages and free communication the theory is (p-1)/(m+p-1) for p ranks and m microbatches, or
(p-1)/(v*m+p-1) with v model chunks per rank (interleaved 1F1B, Narayanan et al. 2021, 2.2).
"""
import json
import statistics
import time

import torch
import torch.distributed as dist

# Bar kinds: forward, full backward, and zero-bubble's split backward (input / weight gradient).
KINDS = {"F": "forward", "B": "backward", "I": "backward (input grad)",
         "W": "backward (weight grad)"}
COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#8FBC8F", "W": "#C44E52"}


class HostClock:
    """Seconds on the host: what a call takes when it returns only once its work is done."""

    name = "host"

    def __init__(self):
        self.zero = time.perf_counter()

    def mark(self):
        return time.perf_counter()

    def reset(self):
        self.zero = self.mark()

    def seconds(self, mark):
        return mark - self.zero


class CudaClock:
    """Seconds on the GPU: a mark is a CUDA event recorded on the current stream, so it is when
    the GPU gets there, not when the host queued the work; readable once the stream has run."""

    name = "cuda events"

    def __init__(self):
        self.zero = None

    def mark(self):
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def reset(self):
        torch.cuda.synchronize()
        self.zero = self.mark()

    def seconds(self, mark):
        return self.zero.elapsed_time(mark) / 1e3


class Timeline:
    """Records (step, kind, microbatch, stage, start, end) for every compute call of `stages`."""

    def __init__(self, stages, device=None):
        self.events = []
        self.pending = []           # the same with the clock's marks, until `read`
        self.step = None            # the step being recorded; None: not recording
        self.clock = CudaClock() if device is not None and device.type == "cuda" else HostClock()
        for stage in stages:
            self._time(stage, "forward_one_chunk", lambda kwargs: "F")
            self._time(stage, "backward_one_chunk",
                       lambda kwargs: "B" if kwargs.get("full_backward", True) else "I")
            self._time(stage, "backward_weight_one_chunk", lambda kwargs: "W")

    def _time(self, stage, method, kind):
        compute = getattr(stage, method)

        def timed(microbatch, *args, **kwargs):
            if self.step is None:
                return compute(microbatch, *args, **kwargs)
            start = self.clock.mark()
            out = compute(microbatch, *args, **kwargs)
            self.pending.append((self.step, kind(kwargs), microbatch, stage.stage_index, start,
                                 self.clock.mark()))
            return out

        setattr(stage, method, timed)

    def align_clocks(self):
        """Every rank's time zero is the end of the same barrier (a collective: call on all)."""
        dist.barrier()
        self.clock.reset()

    def read(self):
        """Turn the marks recorded so far into seconds since time zero: call after the step's
        synchronize, when every CUDA event has happened."""
        self.events += [(*event, self.clock.seconds(start), self.clock.seconds(end))
                        for *event, start, end in self.pending]
        self.pending = []


def theory(p, m, v=1):
    """The ideal bubble share: (p-1)/(v*m+p-1)."""
    return (p - 1) / (v * m + p - 1)


def bubble(events, ranks):
    """{step: (mean over ranks, [idle share per rank])} from events [(rank, step, kind, mb,
    stage, start, end)]."""
    result = {}
    for step in sorted({e[1] for e in events}):
        mine = [e for e in events if e[1] == step]
        span = max(e[6] for e in mine) - min(e[5] for e in mine)
        idle = [1 - sum(e[6] - e[5] for e in mine if e[0] == r) / span for r in range(ranks)]
        result[step] = (statistics.mean(idle), idle)
    return result


def chrome_trace(events, path):
    """Every recorded step as a Chrome trace (open in chrome://tracing or ui.perfetto.dev)."""
    trace = [{"name": "thread_name", "ph": "M", "pid": 0, "tid": r, "args": {"name": f"rank {r}"}}
             for r in sorted({e[0] for e in events})]
    trace += [{"name": f"{kind}{mb}", "cat": KINDS[kind], "ph": "X", "pid": 0, "tid": rank,
               "ts": start * 1e6, "dur": (end - start) * 1e6,
               "args": {"step": step, "microbatch": mb, "stage": stage}}
              for rank, step, kind, mb, stage, start, end in events]
    with open(path, "w") as f:
        json.dump({"traceEvents": trace, "displayTimeUnit": "ms"}, f)


def gantt(events, step, ranks, path, title):
    """One step as a Gantt chart: a row per rank, a bar per compute call, labelled with its
    microbatch (and its stage when a rank holds several)."""
    from matplotlib.patches import Patch

    from partlab.plots import pyplot
    plt = pyplot()

    mine = [e for e in events if e[1] == step]
    t0 = min(e[5] for e in mine)
    several = any(len({e[4] for e in mine if e[0] == r}) > 1 for r in range(ranks))
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.6 * ranks))
    for rank, _, kind, mb, stage, start, end in mine:
        ax.barh(rank, (end - start) * 1e3, left=(start - t0) * 1e3, color=COLORS[kind],
                edgecolor="white", height=0.8)
        ax.text((start + end - 2 * t0) / 2 * 1e3, rank, f"{mb}" + (f"/s{stage}" if several else ""),
                ha="center", va="center", color="white", fontsize=7)
    ax.set_yticks(range(ranks), [f"rank {r}" for r in range(ranks)])
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step's first compute (gaps: bubble and waiting for messages)")
    ax.set_title(title, fontsize=10, loc="left")
    kinds = [k for k in KINDS if any(e[2] == k for e in mine)]
    ax.legend(handles=[Patch(color=COLORS[k], label=KINDS[k]) for k in kinds],
              loc="lower right", bbox_to_anchor=(1.0, 1.0), ncol=len(kinds), fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
