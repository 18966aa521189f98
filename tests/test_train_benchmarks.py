"""Smoke tests of the training benchmarks at their smallest settings: they run to the end and
write well-formed results (no timing is asserted: the numbers depend on the machine)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

TINY_DOCTOR = ["--hidden-size", "64", "--layers", "1", "--heads", "1", "--kv-heads", "1", "--intermediate-size", "64",
               "--vocab-size", "512"]


def finite_positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_tfpo_cost_smallest(tmp_path):
    from benchmarks.tfpo_cost import main

    argv = ["--lengths", "8", "16", "--batch-size", "1", "--prompt-len", "4", "--repeats", "1", "--loss-repeats", "1",
            "--weightings", "all", "trajectory", "--output-dir", str(tmp_path), *TINY_DOCTOR]
    result = main(argv)
    data = json.loads((tmp_path / "tfpo_cost.json").read_text())
    assert (tmp_path / "tfpo_cost.png").stat().st_size > 0
    assert data["command"] == "python -m benchmarks.tfpo_cost " + " ".join(argv)
    for key in ("date", "machine", "model", "settings", "target_ratio", "rows", "meets_target_all_pairs", "caveats"):
        assert key in data, key
    assert data["rows"] == json.loads(json.dumps(result["rows"]))
    assert data["model"]["hidden_size"] == 64 and data["settings"]["batch_pairs"] == 1
    assert [(r["L"], r["weighting"]) for r in data["rows"]] == [(8, "all"), (8, "trajectory"), (16, "all"),
                                                                (16, "trajectory")]
    for r in data["rows"]:
        assert r["rows"] == 2 and r["tokens_per_batch"] == 2 * (4 + r["L"])
        assert finite_positive(r["loss_ms"]) and finite_positive(r["fwd_bwd_ms"])
        assert r["ratio"] == r["loss_ms"] / r["fwd_bwd_ms"]
        assert finite_positive(r["step_ms"]) if r["weighting"] == "all" else r["step_ms"] is None


def test_stage1_speed_smallest(tmp_path):
    """In a fresh process: the benchmark starts (and ends) its own in-process vLLM engine."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.stage1_speed", "--rows", "2", "--repeats", "1",
           "--warmup", "0", "--hidden-size", "64", "--layers", "1", "--hf-batch-size", "4", "--max-model-len", "256",
           "--max-num-seqs", "8", "--kv-cache-mb", "16", "--output-dir", str(out), "--workdir", str(tmp_path / "work")]
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((out / "stage1_speed.json").read_text())
    assert (out / "stage1_speed.png").stat().st_size > 0
    assert data["command"].startswith("python -m benchmarks.stage1_speed --rows 2")
    for key in ("date", "machine", "patient", "data", "settings", "rows", "ratios", "max_abs_logprob_diff_vllm_vs_hf",
                "caveats"):
        assert key in data, key
    assert data["data"]["rows"] == 2 and data["data"]["sequences"] == 8  # 2 responses x 2 instructions a row
    assert [r["scorer"] for r in data["rows"]] == ["hf_reference", "hf_batched", "vllm", "vllm_pipeline"]
    for r in data["rows"]:
        assert finite_positive(r["tokens_per_s"]) and finite_positive(r["response_tokens_per_s"])
        assert math.isclose(r["tokens_per_s"] * r["seconds"], data["data"]["tokens"], rel_tol=1e-9)
    assert set(data["ratios"]) == {"vllm_over_hf_reference", "vllm_over_hf_batched", "vllm_pipeline_over_hf_reference",
                                   "vllm_pipeline_over_hf_batched"}
    assert data["max_abs_logprob_diff_vllm_vs_hf"] < 1e-3  # the two scorers read the same log-probs


def test_tfpo_memory_smallest(tmp_path):
    """The trainer's step and its log-prob computation, each in its own process, on a tiny doctor."""
    argv = ["--batch-sizes", "1", "--length", "8", "--prompt-len", "4", "--layers", "1", "--vocab-size", "512",
            "--hidden-size", "64", "--output-dir", str(tmp_path)]
    p = subprocess.run([sys.executable, "-m", "benchmarks.tfpo_memory", *argv], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads((tmp_path / "tfpo_memory.json").read_text())
    assert (tmp_path / "tfpo_memory.png").stat().st_size > 0
    assert data["command"] == "python -m benchmarks.tfpo_memory " + " ".join(argv)
    assert [(r["batch_pairs"], r["rows"]) for r in data["rows"]] == [(1, 2)]
    row = data["rows"][0]
    assert finite_positive(row["peak_mib"]) and finite_positive(row["step_s"])
    assert finite_positive(row["logprobs_only"]["logits_f32_mib"]) and data["settings"]["L"] == 8
