"""The quality benchmark's outputs: each method's operating point, the targets, the JSON summary,
a markdown table and the plot of reward against the judge's perplexity."""

from __future__ import annotations

from pathlib import Path

from benchmarks.common import save_figure, write_results
from benchmarks.quality.metrics import operating_point

METHODS = ("plain", "prompted", "llmdoctor", "genarm", "args", "best_of_4", "best_of_16")


def summarize_methods(points: dict[str, list[dict]], command: str, ppl_factor: float = 1.2,
                      d2_factor: float = 0.9) -> dict:
    """``{method: entry}``: the operating point's reward (mean over seeds) and spread, its perplexity,
    distinct-2, share of positive replies, length, speed and cost, the setting and every swept point."""
    plain = points["plain"][0]
    out = {}
    for method, pts in points.items():
        best = operating_point(pts, plain, ppl_factor, d2_factor)
        entry = {"reward_at_operating_point": None if best is None else best["reward"],
                 "spread": None if best is None else best["reward_std"], "command": command, "points": pts}
        if best is not None:
            entry |= {k: best[k] for k in ("perplexity", "distinct_2", "positive_share", "mean_tokens",
                                            "tokens_per_second", "calls_per_token", "reward_calls_per_token",
                                            "setting", "seeds")}
        out[method] = entry
    for method in METHODS:
        out.setdefault(method, {"reward_at_operating_point": None, "spread": None, "command": command, "points": [],
                                "note": "not run"})
    return out


def targets(methods: dict) -> dict:
    """Whether LLMdoctor's operating point is >= GenARM's and best-of-4's, above the prompted patient's,
    and (stretch) >= best-of-16's; None where a method has no qualifying point."""
    def r(m):
        return (methods.get(m) or {}).get("reward_at_operating_point")

    doc = r("llmdoctor")

    def cmp(other, strict=False):
        if doc is None or r(other) is None:
            return None
        return doc > r(other) if strict else doc >= r(other)

    return {"llmdoctor_ge_genarm": cmp("genarm"), "llmdoctor_ge_best_of_4": cmp("best_of_4"),
            "llmdoctor_gt_prompted": cmp("prompted", strict=True), "stretch_llmdoctor_ge_best_of_16": cmp("best_of_16")}


def table(methods: dict) -> str:
    """The markdown table of operating points."""
    head = ("| method | VADER at operating point (± std over seeds) | share ≥ 0.5 | perplexity | distinct-2 | "
            "tokens | tokens/s | model calls / token | setting |\n|---|---|---|---|---|---|---|---|---|")
    rows = []
    for m, e in methods.items():
        if e["reward_at_operating_point"] is None:
            why = e.get("note") or "no point within the fluency and diversity bounds"
            rows.append(f"| {m} | {why} | | | | | | | |")
            continue
        setting = ", ".join(f"{k}={v}" for k, v in e["setting"].items()) or "-"
        rows.append(f"| {m} | {e['reward_at_operating_point']:+.3f} ± {e['spread']:.3f} | {e['positive_share']:.2f} | "
                    f"{e['perplexity']:.1f} | {e['distinct_2']:.3f} | {e['mean_tokens']:.1f} | "
                    f"{e['tokens_per_second']:.1f} | {e['calls_per_token']:g} + {e['reward_calls_per_token']:g} "
                    f"reward | {setting} |")
    return "\n".join([head, *rows])


def plot(methods: dict, bounds: dict, path: Path) -> None:
    """Reward against perplexity: every setting (mean over seeds), sweeps as lines, operating points
    starred, the perplexity bound dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (m, e) in enumerate(methods.items()):
        color = f"C{i}"
        groups: dict[str, list] = {}
        for p in e["points"]:
            groups.setdefault(p["setting"].get("rule", ""), []).append(p)
        for rule, pts in groups.items():
            pts = sorted(pts, key=lambda p: p["perplexity"])
            ax.errorbar([p["perplexity"] for p in pts], [p["reward"] for p in pts], yerr=[p["reward_std"] for p in pts],
                        color=color, marker="o" if rule != "delta" else "s", ms=4, lw=1,
                        ls="-" if rule != "delta" else "--", capsize=2, label=f"{m} {rule}".strip())
        if e["reward_at_operating_point"] is not None:
            ax.plot(e["perplexity"], e["reward_at_operating_point"], "*", color=color, ms=14, mec="k")
    ax.axvline(bounds["perplexity_max"], color="grey", ls=":", label="1.2 × plain's perplexity")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity under the judge (Gemma 3 270M), log scale")
    ax.set_ylabel("mean VADER compound")
    ax.set_title("Positive sentiment on SmolLM2-135M-Instruct (★: best point within the bounds)")
    ax.legend(fontsize=7, ncol=2)
    save_figure(fig, path)


def write_report(result: dict, out: Path, name: str, command: str) -> tuple[Path, str]:
    """Writes ``<name>.json``, ``<name>.png`` and returns the JSON path and the markdown table."""
    path = write_results(name, result, out, command=command)
    plot(result["methods"], result["operating_point"], out / f"{name}.png")
    return path, table(result["methods"])
