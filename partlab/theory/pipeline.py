"""A pipeline schedule's theory: the order in which each rank runs its forwards and backwards,
the bubble that order leaves for given per-stage costs (by simulation), its closed forms for
equal stages, and how many microbatches' activations each rank keeps alive.

An order is {rank: [(kind, stage, microbatch), ...]}: F forward, B full backward, or for
zero-bubble I (input gradient) then W (weight gradient). Stage s lives on rank s % p (rank r
holds r, r+p, ...: partition.stage_ids). The orders are derived here, by the rules torch's
schedules run (tests/test_theory.py checks them against torch's own `pipeline_order` and the
timelines of real runs), so that theory needs no process group:

  gpipe             every forward, then every backward
  1f1b              min(m, p-r) forwards, then a backward and a forward by turns, then the last
                    backwards: what Schedule1F1B._step_microbatches runs. Its `pipeline_order`
                    (torch 2.13) cannot be used: the last rank's list starts at microbatch 1 and
                    fails torch's own _validate_schedule (a backward before its forward).
  interleaved-1f1b  torch's _get_1f1b_rank_ops: warm-up forwards, then forward/backward pairs,
  zero-bubble       then the last backwards; chunks advance every `round` microbatches (m/p
                    rounds). Zero-bubble warms up less and puts each weight gradient r slots
                    behind its input gradient.
"""
import collections
import functools

KINDS = ("F", "B", "I", "W")
SCHEDULES = ("gpipe", "1f1b", "interleaved-1f1b", "zero-bubble")


def closed_form(schedule, p, m, v=1):
    """The bubble for p equal stages (per chunk: forward f, backward 2f; for zero-bubble input
    and weight gradient f each) and free messages: (p-1)/(v*m+p-1) (Narayanan et al. 2021),
    and (p-1)/(3*v*m+p-1) for zero-bubble, whose weight gradients fill the cool-down's gaps
    (tests/test_theory.py checks both against the simulation; interleaving needs m a multiple
    of p)."""
    v = 1 if schedule in ("gpipe", "1f1b") else v
    return (p - 1) / ((3 if schedule == "zero-bubble" else 1) * v * m + p - 1)


def closed_form_text(schedule):
    return {"gpipe": "(p-1)/(m+p-1)", "1f1b": "(p-1)/(m+p-1)",
            "interleaved-1f1b": "(p-1)/(v*m+p-1)", "zero-bubble": "(p-1)/(3*v*m+p-1)"}[schedule]


def has_closed_form(schedule, p, m):
    return schedule in ("gpipe", "1f1b") or m % p == 0


def equal_stages(schedule, p, m, v=1):
    """The bubble for equal stages and free messages: the closed form where it holds, else
    (the interleaved schedules with m not a multiple of p) the simulation of unit costs."""
    if has_closed_form(schedule, p, m):
        return closed_form(schedule, p, m, v)
    return ideal_bubble(schedule, p, m, v, unit_cost)


def equal_stages_text(schedule, p, m):
    return closed_form_text(schedule) if has_closed_form(schedule, p, m) else \
        "simulated (the formula needs m a multiple of p)"


@functools.lru_cache(maxsize=4096)
def order(schedule, p, m, v=1):
    """{rank: ((kind, stage, microbatch), ...)} for `schedule` on p ranks, m microbatches and
    (interleaved schedules) v chunks per rank."""
    if schedule == "gpipe":
        ranks = {r: [("F", r, i) for i in range(m)] + [("B", r, i) for i in range(m)]
                 for r in range(p)}
    elif schedule == "1f1b":
        ranks = {r: one_f_one_b(r, p, m) for r in range(p)}
    else:
        ranks = {r: interleaved(r, p, m, v, schedule == "zero-bubble") for r in range(p)}
    return {r: tuple(ops) for r, ops in ranks.items()}     # cached: not to be changed


def one_f_one_b(r, p, m):
    warmup = min(m, p - r)
    ops = [("F", r, i) for i in range(warmup)]
    for i in range(m):
        ops.append(("B", r, i))
        if warmup + i < m:
            ops.append(("F", r, warmup + i))
    return ops


def interleaved(r, p, m, v, zero_bubble):
    rounds = max(1, m // p)
    per_round = m // rounds
    warmup = min((v - 1) * per_round + (1 if zero_bubble else 2) * (p - 1 - r), m * v)
    backward = "I" if zero_bubble else "B"
    done = {kind: [0] * (p * v) for kind in ("F", backward, "W")}

    def take(kind, stage):
        done[kind][stage] += 1
        return (kind, stage, done[kind][stage] - 1)

    def forward_stage(op):
        return (op // per_round) % v * p + r

    def backward_stage(op):
        return (v - 1 - (op - warmup) // per_round % v) * p + r

    ops, backward_stages = [], []
    for op in range(m * v + warmup):
        if op < m * v:
            ops.append(take("F", forward_stage(op)))
        if op >= warmup:
            backward_stages.append(backward_stage(op))
            ops.append(take(backward, backward_stages[-1]))
            if zero_bubble and op - warmup >= r:
                ops.append(take("W", backward_stages[sum(done["W"])]))
    while zero_bubble and sum(done["W"]) < len(backward_stages):
        ops.append(take("W", backward_stages[sum(done["W"])]))
    return ops


def simulate(orders, cost, message=0.0):
    """Run `orders` with cost(kind, stage) seconds per call and `message` seconds for each
    activation or gradient that crosses ranks. Returns {rank: [(kind, stage, microbatch, start,
    end), ...]}. A call starts when its rank is free and its inputs are there: a forward needs
    the previous stage's forward of the microbatch, a backward (B or I) the next stage's (the
    last stage its own forward), a weight gradient its own input gradient."""
    p = len(orders)
    stages = max(s for ops in orders.values() for _, s, _ in ops) + 1
    end, free, nxt = {}, [0.0] * p, [0] * p
    timeline = {r: [] for r in range(p)}
    ready, waiting = collections.deque(range(p)), collections.defaultdict(list)
    while ready:
        r = ready.popleft()
        while nxt[r] < len(orders[r]):
            kind, s, i = orders[r][nxt[r]]
            need = needs(kind, s, i, stages)
            if need is not None and need not in end:
                waiting[need].append(r)      # woken when `need` is done
                break
            ready_at = 0.0 if need is None else end[need] + (message if need[1] % p != r else 0)
            start = max(free[r], ready_at)
            free[r] = end[kind, s, i] = start + cost(kind, s)
            timeline[r].append((kind, s, i, start, free[r]))
            ready.extend(waiting.pop((kind, s, i), ()))
            nxt[r] += 1
    heads = [orders[r][nxt[r]] for r in range(p) if nxt[r] < len(orders[r])]
    if heads:
        raise ValueError(f"the order deadlocks: every rank waits, at {heads}")
    return timeline


def long_span(schedule, p, m, v, cost, message=0.0):
    """The span of `schedule` with m microbatches, without simulating them all where the
    steady state repeats: when 2p, 3p and 4p microbatches add the same time per p, the span of
    4p plus (m - 4p)/p times that; else the whole simulation. Equal stages, or all but one
    heavier (the planner's), repeat from the start and the span is exact to float rounding;
    messages dearer than the calls can drift later (tests/test_plan.py bounds it at 1 %
    over random stage costs and messages)."""
    if m <= 4 * p:
        return span(simulate(order(schedule, p, m, v), cost, message))
    two, three, four = (span(simulate(order(schedule, p, k * p, v), cost, message))
                        for k in (2, 3, 4))
    if abs((four - three) - (three - two)) > 1e-9 * four:
        return span(simulate(order(schedule, p, m, v), cost, message))
    return four + (m - 4 * p) * (four - three) / p


def needs(kind, stage, microbatch, stages):
    """The call (kind, stage, microbatch) this one waits for, or None."""
    if kind == "F":
        return ("F", stage - 1, microbatch) if stage else None
    if kind == "W":
        return ("I", stage, microbatch)
    if stage == stages - 1:
        return ("F", stage, microbatch)
    return (kind, stage + 1, microbatch)


def idle_shares(calls):
    """(mean, [per rank]) of the share of the span, the first call's start to the last call's
    end on any rank, in which a rank computes nothing; calls: {rank: [(start, end), ...]}. The
    bubble, as partlab/timeline.py measures it from a run and `bubble` from a simulation."""
    every = [c for mine in calls.values() for c in mine]
    span = max(end for _, end in every) - min(start for start, _ in every)
    idle = [1 - sum(end - start for start, end in calls[r]) / span for r in sorted(calls)]
    return sum(idle) / len(idle), idle


def bubble(timeline):
    """The bubble of a simulated timeline (`simulate`'s)."""
    return idle_shares({r: [c[3:] for c in calls] for r, calls in timeline.items()})[0]


def span(timeline):
    calls = [c for calls in timeline.values() for c in calls]
    return max(c[4] for c in calls) - min(c[3] for c in calls)


def ideal_bubble(schedule, p, m, v, cost):
    """The bubble of `schedule` for per-call costs cost(kind, stage) and free messages."""
    return bubble(simulate(order(schedule, p, m, v), cost))


def call_cost(kind, forward, backward, extra=0.0):
    """A call's seconds from its stage's forward and backward: zero-bubble's input- and
    weight-gradient calls half the backward each; `extra` added to every call."""
    return extra + {"F": forward, "B": backward, "I": backward / 2, "W": backward / 2}[kind]


def unit_cost(kind, stage):
    """Equal stages: forward 1, backward 2 (input and weight gradient 1 each)."""
    return 2.0 if kind == "B" else 1.0


def chunks(kind, stage):
    """A forward keeps one chunk's activations alive until its backward (B), or its weight
    gradient (W), which still needs the saved inputs, frees them."""
    return {"F": 1, "B": -1, "I": 0, "W": -1}[kind]


def alive(ops, change=chunks):
    """The most a rank holds at once, running its ops in order, each call changing it by
    change(kind, stage): by default, chunks' activations (a chunk is 1/v of a rank's layers).
    A change may be (net, the most held above the start during the call)."""
    live = peak = 0
    for kind, stage, _ in ops:
        net = rise = change(kind, stage)
        if isinstance(net, tuple):
            net, rise = net
        peak = max(peak, live + rise, live + net)
        live += net
    return peak
