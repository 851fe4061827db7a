"""The `partlab bench` figures: one function per sweep, each drawing the sweep's result rows
(partlab/bench.py) into a PNG. matplotlib is imported on first use, so nothing else needs it."""
import itertools


def pyplot():
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt


def save(fig, path, title, caption):
    fig.suptitle(f"{title}\n{caption}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)


def series(rows, *keys):
    """Rows grouped by the values of `keys`, in first-seen order."""
    groups = {}
    for r in rows:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    return groups.items()


def log2_axis(ax, values, label):
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(set(values)), [str(v) for v in sorted(set(values))])
    ax.set_xlabel(label)
    ax.grid(alpha=0.3)


def step(rows, path, caption):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    several = len({r["nproc"] for r in rows if r["strategy"] != "reference"}) > 1
    for (name, nproc), group in series(rows, "strategy", "nproc"):
        label = name + (f", {nproc} ranks" if several and name != "reference" else "")
        fmt = "ko--" if name == "reference" else "o-"
        hidden = [r["hidden_dim"] for r in group]
        left.plot(hidden, [r["step_ms"] for r in group], fmt, label=label)
        right.plot(hidden, [r["samples_per_s"] for r in group], fmt, label=label)
    for ax, what in ((left, "step time (ms)"), (right, "samples/s")):
        log2_axis(ax, [r["hidden_dim"] for r in rows], "hidden dim")
        ax.set_ylabel(what)
    left.set_yscale("log")
    left.legend(fontsize=8)
    save(fig, path, "Step time vs width (reference: one process alone)", caption)


def bubble(rows, path, caption):
    """Measured (solid) and this model's ideal (dashed, same colour) per schedule; the equal-stage
    closed form once per (p, v, zero-bubble or not), in black, as gpipe and 1f1b share theirs."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (schedule, p), group in series(rows, "schedule", "nproc"):
        m = [r["microbatches"] for r in group]
        line, = ax.plot(m, [r["measured"] for r in group], "o-",
                        label=f"{schedule}, p={p}: measured")
        ax.plot(m, [r["ideal"] for r in group], "--", color=line.get_color(), linewidth=1,
                label=f"{schedule}, p={p}: ideal for this model")
    for ((p, v, zb), group), style in zip(
            series([{**r, "zb": r["schedule"] == "zero-bubble"} for r in rows],
                   "nproc", "virtual_stages", "zb"), itertools.cycle(("k:", "k-.", "k--"))):
        points = sorted({(r["microbatches"], r["theory"]) for r in group})
        label = f"equal stages, p={p}, v={v}" + (", zero-bubble" if zb else "")
        ax.plot(*zip(*points, strict=True), style, label=label)
    log2_axis(ax, [r["microbatches"] for r in rows], "microbatches m")
    ax.set_ylabel("bubble (idle share of a step)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    save(fig, path, "Pipeline bubble vs microbatches", caption)


def comm(rows, path, caption):
    """Rank 0's bytes per step per run (all ops): payload measured and analytic, and what it
    puts on the wire (ring all_reduce: 2(t-1)/t x payload; point to point: what it sends)."""
    plt = pyplot()
    runs = list(series([r for r in rows if 0 in r["rank"]], "strategy", "nproc", "hidden_dim"))
    fig, ax = plt.subplots(figsize=(max(8, 1.2 * len(runs)), 4.8))
    bars = (("measured payload", "bytes"), ("analytic payload", "bytes_analytic"),
            ("wire bytes sent", "wire_bytes"))
    for i, (label, key) in enumerate(bars):
        ax.bar([x + (i - 1) * 0.27 for x in range(len(runs))],
               [sum(r[key] or 0 for r in group) / 2**10 for _, group in runs], width=0.27,
               label=label)
    ax.set_xticks(range(len(runs)), [f"{name}\n{p} ranks, h={h}" for (name, p, h), _ in runs],
                  fontsize=7)
    ax.set_ylabel("KiB per step, rank 0 (pipeline: sent + received)")
    ax.legend(fontsize=8)
    save(fig, path, "Communication per step: measured vs analytic", caption)


def memory(rows, path, caption):
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    several = len({r["nproc"] for r in rows}) > 1
    for (p,), group in series(rows, "nproc"):
        m, suffix = [r["microbatches"] for r in group], f" (p={p})" if several else ""
        for rank in range(p):
            for schedule, style in (("gpipe", "o-"), ("1f1b", "s--")):
                left.plot(m, [r[f"{schedule}_activation_mib"][rank] for r in group], style,
                          label=f"{schedule} rank {rank}{suffix}")
            right.plot(m, [r["ratio"][rank] for r in group], "o-",
                       label=f"measured, rank {rank}{suffix}")
        right.plot(m, [r["expected_ratio_rank0"] for r in group], "k--",
                   label=f"expected on rank 0: m/p{suffix}")
    for ax, what in ((left, "peak activation MiB (saved for backward)"),
                     (right, "GPipe / 1F1B activation peak")):
        log2_axis(ax, [r["microbatches"] for r in rows], "microbatches m")
        ax.set_ylabel(what)
        ax.legend(fontsize=7)
    save(fig, path, "Activation memory: GPipe vs 1F1B", caption)


def overhead(rows, path, caption):
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.2))
    names = [f"{r['strategy']}\n{r['nproc']} ranks" for r in rows]
    for i, (label, key) in enumerate((("steps the driver times", "step_overhead"),
                                      ("whole loop (incl. the counted step)", "loop_overhead"))):
        ax.bar([x + (i - 0.5) * 0.4 for x in range(len(rows))], [100 * r[key] for r in rows],
               width=0.4, label=label)
    ax.axhline(5, color="k", linestyle="--", linewidth=1, label="target: +5 %")
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xticks(range(len(rows)), names, fontsize=8)
    ax.set_ylabel("driver loop vs bare loop (%)")
    ax.legend(fontsize=8)
    save(fig, path, "What measuring costs: the driver's loop vs a bare loop, same run", caption)
