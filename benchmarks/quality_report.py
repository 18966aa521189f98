"""The reporting side of the quality benchmark: what each doctor learned (a probe in transformers),
the issue's targets, the markdown table, the plots, and the results files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from benchmarks.quality_metrics import pearson
from llmdoctor_train.toy import pipeline as tp
from llmdoctor_train.toy import world
from llmdoctor_train.toy.patient import torch_threads

from benchmarks.common import save_figure


def probe_doctors(root: Path, paths: dict, n_prompts: int, n_pairs: int = 64, rewards: Path | None = None) -> dict:
    """What each doctor learned against its reference (the delta rule's: a LoRA doctor with its adapter
    off, a full one's starting weights), in transformers.

    ``slots``: mean probability of the good and of the bad words at the adverb slot ("... Assistant:
    The cat _") and the verb slot ("... The cat quickly _") of held-out prompts. ``pairs``: on up to
    ``n_pairs`` training pairs, the doctor's shift of ``log p(chosen) - log p(rejected)`` against
    Stage 1's target ``sum r(chosen) - sum r(rejected)`` (TFPO's optimum matches them; GenARM's
    loss scales them by 1 / beta_r). ``stop``: the probability of ending the reply (EOS or a newline)
    right after one complete neutral sentence: what sets reply length, which the reward counts."""
    import random

    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from llmdoctor_vllm.checkpoint import load_doctor

    tok = AutoTokenizer.from_pretrained(paths["tfpo"])
    tok.padding_side = "right"
    ids = lambda words: [tok(" " + w)["input_ids"][0] for w in words]  # noqa: E731  (one token each)
    rng = random.Random(tp.EVAL_SEED)
    heads = [world.format_prompt(p) + " " + s[0].upper() + s[1:] for p, s in (world.sample_prompt(rng)
                                                                             for _ in range(n_prompts))]
    slots = {"adverb": (heads, ids(world.GOOD_ADVERBS), ids(world.BAD_ADVERBS)),
             "verb": ([h + " " + rng.choice(world.NEUTRAL_ADVERBS) for h in heads], ids(world.GOOD_VERBS),
                      ids(world.BAD_VERBS))}
    sentence = [h + " " + " ".join(rng.choice(w) for w in (world.NEUTRAL_ADVERBS, world.NEUTRAL_VERBS, world.OBJECTS))
                + "." for h in heads]
    stops = [tok.eos_token_id] + [i for i in range(len(tok)) if "\n" in tok.decode([i])]
    pairs = load_from_disk(str(rewards or root / "rewards"))  # Stage 1's output the TFPO doctor trained on
    pairs = pairs.select(range(min(n_pairs, len(pairs))))
    out = {}
    with torch_threads(1), torch.no_grad():
        for name, path in paths.items():
            doctor, reference = _doctor_and_reference(load_doctor(path))
            res = {"slots": {}, "stop": {}}
            for tag, run in (("doctor", doctor), ("reference", reference)):
                for slot, (texts, good, bad) in slots.items():
                    p = _next_token_probs(run, tok, texts)
                    res["slots"][f"{slot}_{tag}"] = {"p_good": float(p[:, good].sum(1).mean()),
                                                     "p_bad": float(p[:, bad].sum(1).mean())}
                res["stop"][tag] = float(_next_token_probs(run, tok, sentence)[:, stops].sum(1).mean())
            shift, target = _pair_shifts(doctor, reference, pairs)
            res["pairs"] = {"logratio_shift": float(np.mean(shift)), "stage1_target": float(np.mean(target)),
                            "pearson": pearson(shift, target), "n": len(shift)}
            out[name] = res
            del doctor, reference
    return out


def _next_token_probs(run, tok, texts: list[str]):
    """``[len(texts), V]``: the next-token distribution of a forward ``run`` after each text (right-padded batch)."""
    import torch

    enc = tok(texts, return_tensors="pt", padding=True)
    last = enc["attention_mask"].sum(1) - 1
    return torch.softmax(run(**enc).logits[torch.arange(len(texts)), last], -1)


def _doctor_and_reference(loaded):
    """Two forwards of a loaded doctor: its LM, and its reference as TFPO's trainer runs it
    (``reference_context``: the adapter off, or the starting weights the manifest names)."""
    from llmdoctor_train.stage2.reference import reference_context

    model = loaded.model.eval()
    frozen = None if loaded.reference_model is None else loaded.reference_model.eval()  # a full doctor's start

    def reference(**inputs):
        module, ctx = reference_context(model, frozen)  # a fresh context per call: disable_adapter() is one-shot
        with ctx:
            return module(**inputs)

    return model, reference


def _pair_shifts(doctor, reference, pairs) -> tuple[list[float], list[float]]:
    """Per pair: the doctor's shift of ``log p(chosen) - log p(rejected)`` (doctor minus reference),
    and Stage 1's target ``sum r(chosen) - sum r(rejected)``."""
    import torch

    shift, target = [], []
    for r in pairs:
        total = 0.0
        for side, sign in (("chosen", 1), ("rejected", -1)):
            x = torch.tensor([r["prompt_ids"] + r[f"{side}_ids"]])
            n = len(r["prompt_ids"])
            for run, w in ((doctor, 1), (reference, -1)):
                lp = torch.log_softmax(run(input_ids=x).logits, -1)[0, n - 1:-1].gather(1, x[0, n:, None]).sum()
                total += sign * w * float(lp)
        shift.append(total)
        target.append(sum(r["chosen_rewards"]) - sum(r["rejected_rewards"]))
    return shift, target


def probe_lines(probe: dict) -> list[str]:
    """One readable line per doctor from :func:`probe_doctors`."""
    lines = []
    for name, r in probe.items():
        sl = r["slots"]
        slots = "; ".join(f"{k} P(good)/P(bad) {sl[k + '_reference']['p_good']:.2f}/{sl[k + '_reference']['p_bad']:.2f}"
                          f" -> {sl[k + '_doctor']['p_good']:.2f}/{sl[k + '_doctor']['p_bad']:.2f}"
                          for k in ("adverb", "verb"))
        stop = f"; P(stop after a sentence) {r['stop']['reference']:.2f} -> {r['stop']['doctor']:.2f}"
        lines.append(f"{name}: {slots}{stop} (reference -> doctor); pair log-ratio shift "
                     f"{r['pairs']['logratio_shift']:+.2f} vs Stage 1 target {r['pairs']['stage1_target']:+.2f} "
                     f"(pearson {r['pairs']['pearson']:.2f})")
    return lines


LABELS = {"patient": "patient", "llmdoctor_product": "LLMdoctor (TFPO), product", "llmdoctor_delta":
          "LLMdoctor (TFPO), delta", "genarm_product": "GenARM, product", "genarm_delta": "GenARM, delta",
          "args": "ARGS (oracle RM)", "best_of_4": "best-of-4 (oracle RM)", "best_of_16": "best-of-16 (oracle RM)",
          "aisp": "AISP (oracle RM)"}


def targets(methods: dict, ppl_factor: float | None = None) -> dict:
    """The issue's targets: among points whose distinct-2 is >= 95% of the patient's, LLMdoctor's best
    reward vs GenARM's best and vs best-of-16's reward (that point's reward whatever its distinct-2,
    and within the floor). With ``ppl_factor``, points must also keep their perplexity under the
    patient within ``ppl_factor`` times the patient's (garbled text is diverse too)."""
    ref = methods["patient"][0]
    floor = 0.95 * ref["distinct_2"]
    ppl_max = ppl_factor * ref["perplexity"] if ppl_factor else float("inf")
    ok = lambda p: p["distinct_2"] >= floor and p.get("perplexity", 0) <= ppl_max  # noqa: E731

    def best(names, within=True):
        pts = [p for m in names for p in methods.get(m, []) if ok(p) or not within]
        return max((p["reward"] for p in pts), default=None)

    ours, genarm = best(["llmdoctor_product", "llmdoctor_delta"]), best(["genarm_product", "genarm_delta"])
    bo16, bo16_all = best(["best_of_16"]), best(["best_of_16"], within=False)
    ge = lambda a, b: None if a is None or b is None else bool(a >= b)  # noqa: E731
    out = {"distinct_2_floor": floor, "llmdoctor_best": ours, "genarm_best": genarm,
           "best_of_16": bo16_all, "best_of_16_within_floor": bo16,
           "llmdoctor_ge_genarm": ge(ours, genarm), "llmdoctor_ge_best_of_16": ge(ours, bo16_all),
           "llmdoctor_ge_best_of_16_within_floor": ge(ours, bo16)}
    if ppl_factor:
        out["perplexity_max"] = ppl_max
    return out


def _fmt_setting(s: dict) -> str:
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in s.items()
                     if k not in ("doctor",)) or "-"


def markdown_table(methods: dict) -> str:
    rows = ["| method | setting | reward | win rate | distinct-2 | self-BLEU | ppl | well-formed | compute |",
            "|---|---|---|---|---|---|---|---|---|"]
    for m, pts in methods.items():
        for p in pts:
            label = LABELS.get(m, f"best-of-{m[8:]} (oracle RM)" if m.startswith("best_of_") else m)
            rows.append(f"| {label} | {_fmt_setting(p['setting'])} | {p['reward']:+.2f} | "
                        f"{p['win_rate']:.2f} | {p['distinct_2']:.3f} | {p['self_bleu']:.3f} | "
                        f"{p['perplexity']:.2f} | {p['wellformed']:.0%} | {p['compute']:.0f} |")
    return "\n".join(rows) + "\n"


def plot(methods: dict, path: Path, x: str, xlabel: str, logx: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    curves = {m: pts for m, pts in methods.items() if pts and not m.startswith("best_of_")}
    curves["best-of-N (oracle RM)"] = sorted((p for m, pts in methods.items() if m.startswith("best_of_") for p in pts),
                                            key=lambda p: p["setting"]["N"])
    garbled = 1.5 * methods["patient"][0]["perplexity"]
    for i, (m, pts) in enumerate(curves.items()):  # points joined in sweep order (beta, w, N ... ascending)
        if not pts:
            continue
        color = "k" if m == "patient" else f"C{i - 1}"
        ax.plot([p[x] for p in pts], [p["reward"] for p in pts], "*" if m == "patient" else "o-", color=color,
                label=LABELS.get(m, m), markersize=12 if m == "patient" else 4)
        bad = [p for p in pts if p["perplexity"] > garbled]
        ax.plot([p[x] for p in bad], [p["reward"] for p in bad], "o", color=color, mfc="white", ms=7)
    ax.plot([], [], "o", color="grey", mfc="white", label="perplexity > 1.5x the patient's (garbled)")
    if x == "distinct_2":
        ax.axvline(0.95 * methods["patient"][0]["distinct_2"], color="grey", ls=":", lw=1,
                   label="95% of the patient's distinct-2")
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("mean held-out task reward (#good - #bad words)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def write_report(result: dict, out: Path, name: str, command: str) -> tuple[Path, str]:
    """Writes ``<name>.json`` (with ``command``), ``<name>.md`` (the table, targets, Stage 1 and the
    probe) and the two plots into ``out``; returns the JSON's path and the markdown table."""
    from benchmarks.common import write_results

    methods = result["methods"]
    path = write_results(name, result, out, command, indent=1)
    table_md = markdown_table(methods)
    (out / f"{name}.md").write_text(
        f"# Alignment quality on the toy task\n\n`{command}`\n\n{result['task']}.\n"
        f"{result['reward_model']}.\n\nCompute: {result['compute_unit']}.\n\n" + table_md
        + f"\nTargets: {json.dumps(result['targets'])}\n\nTargets with perplexity <= 1.5x the patient's: "
          f"{json.dumps(result['targets_fluent'])}\n\nStage 1: {json.dumps(result['stage1'])}\n\nWhat the doctors "
          "learned (probe_doctors):\n\n" + "".join(f"- {line}\n" for line in probe_lines(result["doctors"]["probe"])))
    plot(methods, out / f"{name}.png", "distinct_2", "distinct-2 of the replies (diversity)")
    plot(methods, out / f"{name}_compute.png", "compute", "compute: token forwards per prompt (log)", logx=True)
    return path, table_md
