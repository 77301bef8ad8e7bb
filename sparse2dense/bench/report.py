"""Reports of ``sparse2dense bench``: the Markdown table and one PNG plot per swept dimension."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Point:
    """One benchmark setting."""

    batch: int
    context: int
    budget: int
    gamma: int


@dataclass
class MethodRow:
    """One method at one point (medians over repeats)."""

    method: str
    decode_ms_per_step: float
    e2e_s: float
    tokens_per_s: float
    speedup: float = float("nan")  # over the fastest dense baseline of the point (decode phase)
    mean_accepted_per_round: float | None = None
    acceptance_rate: float | None = None
    memory_mb: float | None = None  # KV caches (+ drafter weight copy) this method allocates
    identical: bool | None = None  # output == transformers greedy output
    differing_tokens: int | None = None  # sparse-only: generated tokens that differ from dense
    limit: float | None = None  # cost model: speedup at perfect acceptance
    expected: float | None = None  # cost model: speedup at the measured acceptance
    fraction_of_expected: float | None = None
    note: str = ""
    stats: dict = field(default_factory=dict)


def markdown(points: list[tuple[Point, list[MethodRow]]], header: str) -> str:
    lines = [header, "",
             "| batch x context | budget | gamma | method | ms/step | speedup | end-to-end s | tok/round | accept | "
             "limit | % of expected | memory MB | identical |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def f(x, fmt):
        return "" if x is None or x != x else format(x, fmt)

    for p, rows in points:
        for r in rows:
            if r.note and r.decode_ms_per_step != r.decode_ms_per_step:
                lines.append(f"| {p.batch} x {p.context} | {p.budget} | {p.gamma} | {r.method} | n/a ({r.note}) "
                             "| | | | | | | | |")
                continue
            ident = "yes" if r.identical else ("NO" if r.identical is False else "")
            if r.method == "sparse-only":
                ident = f"lossy: {r.differing_tokens} tokens differ"
            frac = f(None if r.fraction_of_expected is None else 100 * r.fraction_of_expected, ".0f")
            lines.append(
                f"| {p.batch} x {p.context} | {p.budget} | {p.gamma} | {r.method} | {f(r.decode_ms_per_step, '.1f')} "
                f"| {f(r.speedup, '.2f')}x | {f(r.e2e_s, '.2f')} | {f(r.mean_accepted_per_round, '.2f')} "
                f"| {f(r.acceptance_rate, '.2f')} "
                f"| {f(r.limit, '.2f')} | {frac} | {f(r.memory_mb, '.0f')} | {ident} |")
    return "\n".join(lines)


def plots(points: list[tuple[str, Point, list[MethodRow]]], out: Path) -> list[Path]:
    """One PNG per swept dimension: speedup of each lossless method versus that dimension."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for sweep in sorted({s for s, _, _ in points if s != "point"}):
        sel = [(p, rows) for s, p, rows in points if s == sweep]
        xs = [getattr(p, sweep) for p, _ in sel]
        fig, ax = plt.subplots(figsize=(7, 4.2))
        methods = [r.method for r in sel[0][1] if r.method not in ("hf-dynamic", "hf-static", "sparse-only")]
        for m in methods:
            ys = [next((r.speedup for r in rows if r.method == m), float("nan")) for _, rows in sel]
            if all(y != y for y in ys):
                continue
            ax.plot(xs, ys, marker="o", label=m)
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel({"context": "prompt tokens", "batch": "batch size", "budget": "drafter budget",
                       "gamma": "gamma (draft tokens per round)"}[sweep])
        ax.set_ylabel("decode speedup over fastest dense")
        if sweep in ("batch", "budget", "context"):
            ax.set_xscale("log", base=2)
        ax.set_title(f"speedup vs {sweep}")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = out / f"speedup_vs_{sweep}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
