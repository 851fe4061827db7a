"""The measuring tools, in-process: the timeline's bubble arithmetic and trace, and the
activation meter (no processes, no timings)."""
import json

import pytest
import torch
from torch import nn

from partlab import timeline
from partlab.counters import ActivationMeter
from partlab.theory import pipeline


def simulated_gpipe(p, m, forward, backward):
    """Events of an ideal GPipe step, written out here (independent of partlab/theory): each op
    starts when its rank is free and its input has arrived (messages take no time)."""
    events, free, done = [], [0.0] * p, {}
    for mb in range(m):
        for r in range(p):
            start = max(free[r], done.get(("F", r - 1, mb), 0.0))
            free[r] = done["F", r, mb] = start + forward
            events.append((r, 0, "F", mb, r, start, start + forward))
    for mb in range(m):
        for r in reversed(range(p)):
            start = max(free[r], done.get(("B", r + 1, mb), 0.0))
            free[r] = done["B", r, mb] = start + backward
            events.append((r, 0, "B", mb, r, start, start + backward))
    return events


@pytest.mark.parametrize("p,m", [(2, 1), (2, 8), (4, 4), (3, 16)])
def test_bubble_of_an_ideal_gpipe_step_is_the_closed_form(p, m):
    events = simulated_gpipe(p, m, forward=1.0, backward=2.0)
    mean, per_rank = timeline.bubble(events, p)[0]
    assert mean == pytest.approx(pipeline.closed_form("gpipe", p, m))
    assert per_rank == pytest.approx([(p - 1) / (m + p - 1)] * p)
    assert timeline.span(events, 0) == pytest.approx(3 * (m + p - 1))


def test_bubble_counts_a_stalled_rank():
    # Rank 1 waits 3 units before its only op: idle 3 of a 4-unit span.
    events = [(0, 0, "F", 0, 0, 0.0, 4.0), (1, 0, "F", 0, 1, 3.0, 4.0)]
    assert timeline.bubble(events, 2)[0] == (pytest.approx(0.375), [0.0, 0.75])


def test_chrome_trace_has_one_event_per_compute_call(tmp_path):
    events = simulated_gpipe(2, 3, 1.0, 2.0)
    timeline.chrome_trace(events, tmp_path / "t.json")
    trace = json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    calls = [e for e in trace if e["ph"] == "X"]
    assert len(calls) == len(events)
    assert {(e["tid"], e["name"]) for e in calls} == {(r, f"{k}{mb}") for r, _, k, mb, *_ in events}
    assert sorted(e["dur"] for e in calls) == sorted((e[6] - e[5]) * 1e6 for e in events)


def test_gantt_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib", reason="partlab[plots] not installed")
    timeline.gantt(simulated_gpipe(2, 4, 1e-3, 2e-3), 0, 2, tmp_path / "g.png", "test")
    assert (tmp_path / "g.png").read_bytes()[:4] == b"\x89PNG"


def test_activation_meter_counts_saved_tensors_once_and_frees_them():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    meter = ActivationMeter(net.parameters())
    with meter:
        loss = net(x).sum()
    # Saved: the input of the first linear (5x8) and the ReLU output (5x16), which the ReLU
    # and the second linear both keep: counted once. Weights are parameters: not counted.
    assert meter.peak == 4 * (5 * 8 + 5 * 16)
    with meter:
        second = net(x + 1).sum()      # a second microbatch alive at the same time (GPipe)
    assert meter.peak == 2 * 4 * (5 * 8 + 5 * 16)
    (loss + second).backward()
    del loss, second
    assert meter.live == 0


class QueuedClock:
    """A clock like CUDA's: a mark's time is known only once the queued work has run."""

    def __init__(self):
        self.times, self.ran = [], False

    def mark(self):
        self.times.append(0.5 * len(self.times))
        return len(self.times) - 1

    def reset(self):
        pass

    def seconds(self, mark):
        assert self.ran, "a mark was read before the step synchronized"
        return self.times[mark]


class Stage:
    stage_index = 1

    def forward_one_chunk(self, microbatch, *args, **kwargs):
        return "out"

    def backward_one_chunk(self, microbatch, *args, **kwargs):
        return None

    def backward_weight_one_chunk(self, microbatch, *args, **kwargs):
        return None


@pytest.mark.fast
def test_the_timeline_reads_its_clock_only_after_the_step():
    stage = Stage()
    recorder = timeline.Timeline([stage])
    recorder.clock = QueuedClock()
    stage.forward_one_chunk(3)                   # not recording: no marks
    recorder.step = 0
    assert stage.forward_one_chunk(3) == "out"
    stage.backward_one_chunk(3, full_backward=False)
    stage.backward_weight_one_chunk(3)
    assert recorder.events == [] and len(recorder.pending) == 3
    recorder.clock.ran = True                    # what the step's synchronize guarantees
    recorder.read()
    assert recorder.events == [(0, "F", 3, 1, 0.0, 0.5), (0, "I", 3, 1, 1.0, 1.5),
                               (0, "W", 3, 1, 2.0, 2.5)]
    assert recorder.pending == []


@pytest.mark.fast
def test_the_timeline_times_the_gpu_on_cuda_and_the_host_on_cpu():
    assert isinstance(timeline.Timeline([], torch.device("cpu")).clock, timeline.HostClock)
    assert isinstance(timeline.Timeline([], torch.device("cuda", 0)).clock, timeline.CudaClock)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_events_time_the_kernels_not_their_launch():
    # A ~50 ms kernel is queued in microseconds: the host clock would see almost nothing.
    clock = timeline.CudaClock()
    clock.reset()
    start = clock.mark()
    torch.cuda._sleep(50_000_000)
    end = clock.mark()
    torch.cuda.synchronize()
    assert clock.seconds(end) - clock.seconds(start) > 0.01
