"""Smoke tests: the throughput and runner-cost benchmarks run at their smallest settings and write
well-formed results (numbers are the benchmarks' business, not the tests')."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> None:
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
    out = subprocess.run([sys.executable, "-m", f"benchmarks.{script}", *args], cwd=ROOT, capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_throughput_smallest(tmp_path):
    _run("throughput", "--batch-sizes", "1", "2", "--prompt-len", "8", "--output-len", "4", "--repeats", "1",
         "--step-lengths", "32", "--workdir", str(tmp_path / "models"), "--output-dir", str(tmp_path))
    result = json.loads((tmp_path / "throughput.json").read_text())
    assert (tmp_path / "throughput.png").stat().st_size > 0
    modes = {(r["mode"], r["batch_size"]) for r in result["rows"]}
    assert modes == {(m, b) for m in ("plain", "guided", "guided_2_doctors", "hf_loop") for b in (1, 2)}
    for r in result["rows"]:
        assert r["output_tokens_per_s"] > 0 and r["ttft_s"] > 0 and r["tpot_ms"] >= 0, r
    assert 0 < result["limit_ratio"] < 1
    assert [s["cached_tokens"] for s in result["doctor_step_cost"]] == [32]


def test_runner_cost_smallest(tmp_path):
    _run("runner_cost", "--shapes", "tiny", "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1", "2",
         "--lengths", "16", "--repeats", "1", "--output-dir", str(tmp_path))
    result = json.loads((tmp_path / "runner_cost.json").read_text())
    assert (tmp_path / "runner_cost.png").stat().st_size > 0
    assert [(r["batch_size"], r["cached_tokens"]) for r in result["rows"]] == [(1, 16), (2, 16)]
    for r in result["rows"]:
        assert r["patient_step_ms"] > 0 and r["doctor_step_ms"] > 0 and r["doctor_delta_ms"] > 0
        assert 0 < r["est_ratio"] < 1
        assert r["patient_captured"] is False  # CPU: the static step runs eagerly
    assert result["patient_cuda_graphs"] is False and result["targets"]["doctor_step_le_1.2x_kernel"] is None


def test_runner_cost_patient_static_step_equals_the_dynamic_cache_step():
    """The patient step runner_cost times (static cache, what it captures on a GPU) computes the
    same next-token logits as transformers' ordinary decode with a dynamic cache, at every call."""
    import torch
    from transformers import DynamicCache

    from benchmarks.common import SHAPES
    from benchmarks.runner_cost import build, static_decode_step

    model = build(SHAPES["tiny"][0], "cpu", torch.float32, 0)
    ids = torch.randint(2, 300, (3, 20))
    with torch.inference_mode():
        step, captured = static_decode_step(model, ids, capture=True)
        cache = DynamicCache()
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        ref = model(input_ids=ids[:, -1:], past_key_values=cache, use_cache=True).logits
        full = model(input_ids=torch.cat([ids, ids[:, -1:]], dim=1)).logits[:, -1:]
        for _ in range(2):  # a replayed step rewrites the same position: same result each time
            torch.testing.assert_close(step(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ref, full, rtol=1e-4, atol=1e-4)
    assert captured is False  # no CUDA here
