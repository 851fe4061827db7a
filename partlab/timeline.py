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
computed between its calls, so it counts as idle: microseconds per microbatch.) What it is in
theory, for equal stages or this model's own, is partlab/theory/pipeline.py's.
"""
import dataclasses
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from partlab.theory import pipeline as theory

# Bar kinds: forward, full backward, and zero-bubble's split backward (input / weight gradient).
KINDS = {"F": "forward", "B": "backward", "I": "backward (input grad)",
         "W": "backward (weight grad)"}
COLORS = {"F": "#4C72B0", "B": "#55A868", "I": "#8FBC8F", "W": "#C44E52"}


@dataclasses.dataclass
class Bubble:
    """A pipeline's idle share of a step, measured from its timeline, beside the theory
    (partlab/theory/pipeline.py): the closed form for equal stages, and this model's ideal, the
    schedule's order run with the run's own compute times and messages that take no time. What
    the measured bubble has beyond the ideal is time between calls: messages and Python."""

    measured: float                # median over the timed steps
    theory: float                  # equal stages, free messages (theory.pipeline.equal_stages)
    ideal: float                   # the order simulated with this run's median call times
    order_as_theory: bool          # every rank ran its calls in theory.pipeline.order's order
    span_s: float                  # a step's span, first call to last (median), measured
    ideal_span_s: float            # the same, simulated
    steps: list[int]               # the timed steps (1-based)
    per_step: list[float]
    per_rank: list[float]
    files: list[str] | None        # --timeline PNG and Chrome trace
    clock: str = "host"            # what timed the calls: "host", or "cuda events" on a GPU


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


def bubble(events, ranks):
    """{step: (mean over ranks, [idle share per rank])} from events [(rank, step, kind, mb,
    stage, start, end)]."""
    return {step: theory.idle_shares({r: [e[5:] for e in events if e[1] == step and e[0] == r]
                               for r in range(ranks)})
            for step in sorted({e[1] for e in events})}


def span(events, step):
    """Seconds from the step's first call on any rank to its last."""
    mine = [e for e in events if e[1] == step]
    return max(e[6] for e in mine) - min(e[5] for e in mine)


def measure(events, settings, p, ranks, steps, clock, name):
    """The Bubble of the timed `steps` of a run of p pipeline ranks (`ranks` processes: p x the
    tensor-parallel ones) from all ranks' events, next to the theory and this model's ideal;
    --timeline files of the last step."""
    m, v = settings.microbatches, settings.virtual_stages
    by_step = bubble(events, ranks)
    timed = [e for e in events if e[1] in steps]
    cost = {key: statistics.median(e[6] - e[5] for e in timed if (e[2], e[4]) == key)
            for key in {(e[2], e[4]) for e in timed}}
    order = theory.order(settings.schedule, p, m, v)
    ideal = theory.simulate(order, lambda kind, stage: cost[kind, stage])
    ran = {r: [(e[2], e[4], e[3]) for e in sorted(events, key=lambda e: e[5])
               if e[1] == steps[0] and e[0] == r] for r in range(ranks)}
    result = Bubble(measured=statistics.median(by_step[s][0] for s in steps),
                    theory=theory.equal_stages(settings.schedule, p, m, v),
                    ideal=theory.bubble(ideal),
                    order_as_theory=all(tuple(ran[r]) == order[r // (ranks // p)]
                                        for r in range(ranks)),
                    span_s=statistics.median(span(events, s) for s in steps),
                    ideal_span_s=theory.span(ideal),
                    steps=[s + 1 for s in steps], per_step=[by_step[s][0] for s in sorted(by_step)],
                    per_rank=[statistics.median(by_step[s][1][r] for s in steps)
                              for r in range(ranks)], files=None, clock=clock)
    if settings.timeline:
        os.makedirs(os.path.dirname(settings.timeline) or ".", exist_ok=True)
        png, trace = settings.timeline + ".png", settings.timeline + ".json"
        chrome_trace(events, trace)
        title = (f"{name}: p={p}, m={m}, v={v}, step {steps[-1] + 1}; bubble "
                 f"{by_step[steps[-1]][0]:.1%} (this model's ideal {result.ideal:.1%}, equal "
                 f"stages {result.theory:.1%})")
        gantt(events, steps[-1], ranks, png, title)
        result.files = [png, trace]
    return result


def summary(b, s, p):
    """A run's bubble lines: measured, ideal and closed form; the gap; the --timeline files."""
    calls = len(theory.order(s["schedule"], p, s["microbatches"], s["virtual_stages"])[0])
    lines = [f"bubble (idle share of a step, from the timeline ({b.clock} clock), median of "
             f"steps {b.steps[0]}-{b.steps[-1]}): {b.measured:.1%}; this model's ideal "
             f"{b.ideal:.1%} (the schedule's order at this run's call times, free messages); "
             f"equal stages {theory.equal_stages_text(s['schedule'], p, s['microbatches'])} = "
             f"{b.theory:.1%}",
             f"  the gap: a step spans {b.span_s * 1e3:,.2f} ms against the ideal's "
             f"{b.ideal_span_s * 1e3:,.2f} ms, {(b.span_s - b.ideal_span_s) / calls * 1e6:+,.0f} "
             f"us per call of a rank ({calls} calls): messages and Python between calls"
             + ("" if b.order_as_theory else "; warning: the ranks did not run the theory's "
                "order (partlab/theory/pipeline.py), so the ideal is not this schedule's")]
    if b.files:
        lines.append("timeline: " + ", ".join(b.files))
    return "\n".join(lines)


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
