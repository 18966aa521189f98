"""The fluent frontier of the quality benchmark, over seeds.

Per method and diversity level: the best held-out reward among the method's points with >= 90%
well-formed replies and distinct-2 >= 0.30 / 0.25 / 0.20, in each seed's ``quality*.json``; then
the mean, standard deviation and range over seeds. Reply length sits beside reward: the task
reward counts words, so a longer reply can earn more. ``length_part`` is the part of a point's
gain over the patient that its extra length explains at its own reward density
(``R - R * W_patient / W``); ``length_share`` is that part over the whole gain. Where each one-knob
sweep crosses a level is reported too (independent of where the grid puts points), as reward and
as reward held at the patient's length; LLMdoctor minus GenARM is also given seed by seed.

    python -m benchmarks.quality_frontier benchmarks/results/quality_s*.json --name quality_seeds
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

LEVELS = (0.30, 0.25, 0.20)
WELLFORMED = 0.9
SWEEPS = ("llmdoctor_product", "llmdoctor_delta", "genarm_product", "genarm_delta", "args")  # one knob each
ROWS = {"llmdoctor": ("llmdoctor_product", "llmdoctor_delta"), "llmdoctor_product": ("llmdoctor_product",),
        "llmdoctor_delta": ("llmdoctor_delta",), "genarm": ("genarm_product", "genarm_delta"),
        "genarm_product": ("genarm_product",), "genarm_delta": ("genarm_delta",), "args": ("args",),
        "best_of_16": ("best_of_16",), "aisp": ("aisp",)}
LABELS = {"llmdoctor": "LLMdoctor (TFPO), best rule", "llmdoctor_product": "LLMdoctor (TFPO), product",
          "llmdoctor_delta": "LLMdoctor (TFPO), delta", "genarm": "GenARM, best rule",
          "genarm_product": "GenARM, product", "genarm_delta": "GenARM, delta", "args": "ARGS (oracle RM)",
          "best_of_16": "best-of-16 (oracle RM)", "aisp": "AISP (oracle RM)"}


def best_point(points: list[dict], level: float, wellformed: float = WELLFORMED) -> dict | None:
    """The highest-reward point with ``wellformed`` >= the bar and ``distinct_2 >= level``, or None."""
    ok = [p for p in points if p["wellformed"] >= wellformed and p["distinct_2"] >= level]
    return max(ok, key=lambda p: p["reward"], default=None)


def crossing(points: list[dict], level: float, wellformed: float = WELLFORMED,
             value=lambda p: p["reward"]) -> float | None:
    """The reward (or ``value(point)``) where a one-knob sweep (``points`` in sweep order, e.g. rising
    beta) crosses ``distinct_2 = level``: linear between consecutive fluent points on either side (the
    highest crossing if there are several); None if the sweep does not cross it. Unlike ``best_point``
    it does not depend on where the grid happens to put a point."""
    ok = [p for p in points if p["wellformed"] >= wellformed]
    found = [value(a) + (a["distinct_2"] - level) / (a["distinct_2"] - b["distinct_2"]) * (value(b) - value(a))
             for a, b in zip(ok, ok[1:])
             if a["distinct_2"] != b["distinct_2"] and min(a["distinct_2"], b["distinct_2"]) <= level
             <= max(a["distinct_2"], b["distinct_2"])]
    return max(found, default=None)


def length_terms(point: dict, patient: dict) -> dict:
    """Reward, words, and how much of the gain over the patient the extra length explains."""
    r, w, rp, wp = point["reward"], point["mean_words"], patient["reward"], patient["mean_words"]
    part = r - r * wp / w if w > 0 else 0.0
    gain = r - rp
    return {"reward": r, "mean_words": w, "distinct_2": point["distinct_2"], "wellformed": point["wellformed"],
            "setting": point["setting"], "reward_at_patient_length": r * wp / w if w > 0 else 0.0,
            "length_part": part, "length_share": part / gain if gain > 0 else None}


def frontier(result: dict, levels=LEVELS) -> dict:
    """``{row: {level: length_terms(best point) or None}}`` of one benchmark result."""
    methods, patient = result["methods"], result["methods"]["patient"][0]
    out = {}
    for row, names in ROWS.items():
        pts = [p for m in names for p in methods.get(m, [])]
        out[row] = {f"{lv:.2f}": (lambda b: b and length_terms(b, patient))(best_point(pts, lv)) for lv in levels}
    out["patient"] = length_terms(patient, patient) | {"length_part": 0.0, "length_share": None}
    at_length = lambda p: length_terms(p, patient)["reward_at_patient_length"]  # noqa: E731
    cross, cross_at_length = {}, {}
    for row, names in ROWS.items():
        sweeps = [m for m in names if m in SWEEPS]
        if not sweeps:
            continue
        cross[row], cross_at_length[row] = {}, {}
        for lv in levels:
            # a row with two rules takes the rule that crosses with the higher reward, in both views
            found = [(c, m) for m in sweeps if (c := crossing(methods.get(m, []), lv)) is not None]
            reward, rule = max(found, default=(None, None))
            cross[row][f"{lv:.2f}"] = reward
            cross_at_length[row][f"{lv:.2f}"] = rule and crossing(methods[rule], lv, value=at_length)
    return out | {"crossing": cross, "crossing_at_patient_length": cross_at_length}


def _stats(values: list[float]) -> dict:
    a = np.asarray(values, dtype=float)
    if a.size == 0:
        return {"n": 0}
    return {"n": int(a.size), "mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max())}


def aggregate(fronts: list[dict], levels=LEVELS) -> dict:
    """Mean and spread over seeds of each row's frontier reward, length and length share."""
    out = {}
    for row in ROWS:
        out[row] = {}
        for lv in (f"{x:.2f}" for x in levels):
            pts = [f[row][lv] for f in fronts if f[row][lv]]
            shares = [p["length_share"] for p in pts if p["length_share"] is not None]
            out[row][lv] = {"reward": _stats([p["reward"] for p in pts]),
                            "mean_words": _stats([p["mean_words"] for p in pts]),
                            "reward_at_patient_length": _stats([p["reward_at_patient_length"] for p in pts]),
                            "length_share": _stats(shares), "seeds_with_a_point": len(pts)}
    out["patient"] = {k: _stats([f["patient"][k] for f in fronts]) for k in ("reward", "mean_words", "distinct_2")}
    for key in ("crossing", "crossing_at_patient_length"):
        out[key] = {row: {lv: _stats([f[key][row][lv] for f in fronts if f[key][row][lv] is not None])
                          for lv in fronts[0][key][row]}
                    for row in fronts[0][key]}
    return out


def targets(agg: dict, levels=LEVELS) -> dict:
    """The issue's targets per level: LLMdoctor's mean (best rule per seed) >= GenARM's and >= best-of-16's."""
    out = {}
    for lv in (f"{x:.2f}" for x in levels):
        ours = agg["llmdoctor"][lv]["reward"].get("mean")
        gen = agg["genarm"][lv]["reward"].get("mean")
        bo16 = agg["best_of_16"]["0.20"]["reward"].get("mean")  # best-of-16's fluent reward, whatever its distinct-2
        out[lv] = {"llmdoctor": ours, "genarm": gen, "best_of_16": bo16,
                   "ge_genarm": None if ours is None or gen is None else bool(ours >= gen),
                   "ge_best_of_16": None if ours is None or bo16 is None else bool(ours >= bo16),
                   "ratio_to_genarm": None if not ours or not gen else ours / gen}
        if "crossing" in agg:  # the same comparison where the sweeps cross the level (grid-independent)
            oc, gc = (agg["crossing"][r][lv].get("mean") for r in ("llmdoctor", "genarm"))
            out[lv] |= {"llmdoctor_crossing": oc, "genarm_crossing": gc,
                        "ge_genarm_crossing": None if oc is None or gc is None else bool(oc >= gc)}
    return out


def _cell(s: dict, words: dict | None = None, seeds: int | None = None) -> str:
    """``mean ± std (range; n seeds)``, or ``(range; mean words)`` beside a frontier reward, with the
    seed count added when the method ran in fewer than ``seeds`` (e.g. doctors-only runs mixed in)."""
    if not s.get("n"):
        return "—"
    n = "" if words is None else f"; {words['mean']:.1f} w"
    if words is None or (seeds is not None and s["n"] < seeds):
        n += f"; {s['n']} seed{'s' * (s['n'] != 1)}"
    return f"{s['mean']:+.2f} ± {s['std']:.2f} ({s['min']:+.2f}…{s['max']:+.2f}{n})"


def paired(fronts: list[dict], levels=LEVELS, ours: str = "llmdoctor", other: str = "genarm") -> dict:
    """Per level, ``ours - other`` seed by seed (the same world, prompts and sampling seeds), on the
    frontier and at the crossing: mean, spread and standard error of the mean over the seeds where
    both have a value. Pairing removes what the seeds share, so it says more than two separate means."""
    out = {}
    for lv in (f"{x:.2f}" for x in levels):
        front = [f[ours][lv]["reward"] - f[other][lv]["reward"] for f in fronts if f[ours][lv] and f[other][lv]]
        cross = {k: [f[k][ours][lv] - f[k][other][lv] for f in fronts
                     if f[k][ours][lv] is not None and f[k][other][lv] is not None]
                 for k in ("crossing", "crossing_at_patient_length")}
        out[lv] = {k: (st := _stats(d)) | ({"sem": st["std"] / np.sqrt(st["n"])} if st["n"] else {})
                   for k, d in (("frontier", front), *cross.items())}
    return out


def _paired_md(diff: dict) -> str:
    cell = lambda s: ("—" if not s.get("n")  # noqa: E731
                      else f"{s['mean']:+.2f} ± {s['sem']:.2f} ({s['n']} seed{'s' * (s['n'] != 1)})")
    return ("\nLLMdoctor − GenARM seed by seed (mean ± standard error of the mean):\n\n| | "
            + " | ".join(f"distinct-2 {x}" for x in diff) + " |\n|---|" + "---|" * len(diff) + "\n"
            + "\n".join(f"| {k.replace('_', ' ')} | " + " | ".join(cell(diff[x][k]) for x in diff) + " |"
                        for k in ("frontier", "crossing", "crossing_at_patient_length"))
            + "\n")


def markdown(agg: dict, levels=LEVELS) -> str:
    """The frontier table (mean ± std (range; mean words) over seeds) and the length table."""
    lv = [f"{x:.2f}" for x in levels]
    head = "| method | " + " | ".join(f"distinct-2 ≥ {x}" for x in lv) + " |\n|---|" + "---|" * len(lv) + "\n"
    seeds = agg["patient"]["reward"]["n"]
    rows = [f"| {LABELS[r]} | " + " | ".join(_cell(agg[r][x]["reward"], agg[r][x]["mean_words"], seeds) for x in lv)
            + " |" for r in ROWS]
    share = lambda s: "—" if not s.get("n") else f"{s['mean']:.0%}"  # noqa: E731
    at_len = lambda s: "—" if not s.get("n") else f"{s['mean']:+.2f}"  # noqa: E731
    rows2 = [f"| {LABELS[r]} | " + " | ".join(f"{at_len(agg[r][x]['reward_at_patient_length'])} / "
                                               f"{share(agg[r][x]['length_share'])}" for x in lv) + " |"
             for r in ROWS]
    p = agg["patient"]
    return (head + "\n".join(rows) + f"\n\nPatient: {p['reward']['mean']:+.2f}, {p['mean_words']['mean']:.1f} words, "
            f"distinct-2 {p['distinct_2']['mean']:.3f}.\n\nReward at the patient's length (R × W_patient / W) / share "
            "of the gain over the patient that the extra length explains:\n\n" + head + "\n".join(rows2) + "\n"
            + "\nWhere each one-knob sweep crosses distinct-2 = the level (linear between neighbouring fluent points; "
            "mean ± std (range) over the seeds that cross it), which does not depend on where the grid puts points:\n\n"
            + _crossing_md(agg["crossing"], head) + "\n\nThe same crossing held at the patient's length (R × W_patient / W "
            "along the sweep, for the rule that crosses with the higher reward):\n\n"
            + _crossing_md(agg["crossing_at_patient_length"], head) + "\n")


def _crossing_md(cross: dict, head: str) -> str:
    lv = list(next(iter(cross.values())))
    return head.replace("≥", "=") + "\n".join(f"| {LABELS[r]} | " + " | ".join(_cell(cross[r][x]) for x in lv) + " |"
                                             for r in cross)


def plot(results: list[dict], path: Path) -> None:
    """Reward vs distinct-2 of every fluent point (>= 90% well-formed), one colour per method, one marker per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from benchmarks.common import save_figure

    fig, ax = plt.subplots(figsize=(8, 5.5))
    names = [r for r in ROWS if len(ROWS[r]) == 1]
    for s, res in enumerate(results):
        for i, row in enumerate(names):
            pts = sorted((p for p in res["methods"].get(ROWS[row][0], []) if p["wellformed"] >= WELLFORMED),
                         key=lambda p: p["distinct_2"])
            ax.plot([p["distinct_2"] for p in pts], [p["reward"] for p in pts], "osd^v"[s % 5] + "-", color=f"C{i}",
                    lw=0.8, ms=4, alpha=0.8, label=LABELS[row] if s == 0 else None)
    for lv in LEVELS:
        ax.axvline(lv, color="grey", ls=":", lw=1)
    ax.set_xlabel("distinct-2 (points with >= 90% well-formed replies; markers: seeds)")
    ax.set_ylabel("mean held-out task reward")
    ax.set_xlim(0.15, 0.37)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


DOCTOR_METHODS = ("llmdoctor_product", "llmdoctor_delta", "genarm_product", "genarm_delta")


def merge_doctors(base: dict, variant: dict) -> dict:
    """``base`` with its doctor points (and TFPO and decoding settings) taken from ``variant``, a
    --tfpo-only or --doctors-only run of the same seeds: every doctor method the variant decoded
    replaces the base's. The patient's point must match, so both decoded the same prompts with the
    same seeds."""
    keys = ("world_seed", "train_seed", "sample_seed", "n_eval", "max_tokens")
    if any(base["settings"].get(k, 0) != variant["settings"].get(k, 0) for k in keys) or \
            base["methods"]["patient"][0]["reward"] != variant["methods"]["patient"][0]["reward"]:
        raise SystemExit(f"quality_frontier: {variant['command']!r} does not match {base['command']!r}")
    methods = base["methods"] | {m: variant["methods"][m] for m in DOCTOR_METHODS if variant["methods"].get(m)}
    varied = ("tfpo_arg", "tag", "reward_sign", "append_eos", "patient_min_p", "alpha")
    settings = base["settings"] | {k: variant["settings"][k] for k in varied if k in variant["settings"]}
    return base | {"methods": methods, "settings": settings}


def main(argv=None) -> dict:
    """Reads seed results, writes ``<name>.json``, ``<name>.md`` and ``<name>.png``."""
    from benchmarks.common import RESULTS, command_line, write_results

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="quality*.json files, one per seed")
    p.add_argument("--doctors-from", "--tfpo-from", dest="doctors_from", nargs="+", action="append", metavar="JSON",
                   help="per seed, a --tfpo-only or --doctors-only run whose doctor points replace those of "
                        "RESULTS (same order, same seeds): a TFPO or decoding variant against the same baselines "
                        "without decoding them again; repeat to merge several in turn (e.g. GenARM's points from "
                        "a --doctors-only run, then TFPO's from a --tfpo-only one)")
    p.add_argument("--output-dir", default=str(RESULTS))
    p.add_argument("--name", default="quality_seeds")
    args = p.parse_args(argv)
    results = [json.loads(Path(f).read_text()) for f in args.results]
    for files in args.doctors_from or ():
        results = [merge_doctors(r, json.loads(Path(f).read_text())) for r, f in zip(results, files, strict=True)]
    fronts = [frontier(r) for r in results]
    agg = aggregate(fronts)
    seed_keys = ("world_seed", "train_seed", "sample_seed", "tfpo_arg", "tag", "reward_sign", "append_eos",
                 "patient_min_p", "alpha")
    payload = {"sources": args.results, "doctors_from": args.doctors_from, "wellformed_min": WELLFORMED,
               "levels": LEVELS, "seeds": [{k: r["settings"].get(k) for k in seed_keys} for r in results],
               "aggregate": agg, "paired_llmdoctor_minus_genarm": paired(fronts), "targets": targets(agg),
               "per_seed": fronts}
    out = Path(args.output_dir)
    write_results(args.name, payload, out, command_line(__file__, argv), indent=1)
    md = markdown(agg) + _paired_md(payload["paired_llmdoctor_minus_genarm"])
    (out / f"{args.name}.md").write_text(f"# The fluent frontier over seeds\n\n`{command_line(__file__, argv)}`\n\n"
                                         + md + f"\nTargets: {json.dumps(payload['targets'])}\n")
    plot(results, out / f"{args.name}.png")
    print(md)
    print(json.dumps(payload["targets"], indent=1))
    return payload


if __name__ == "__main__":
    main()
