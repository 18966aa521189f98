"""``benchmarks/gpu_check.py`` runs its CPU-possible checks here, so the script a GPU maintainer
runs does not rot: each check starts its own engine in a child process."""

from __future__ import annotations

import json


def test_gpu_check_cpu_subset(tmp_path):
    from benchmarks.gpu_check import main

    checks = ["chunked_prefill", "preemption", "spec_decode_refused", "async_scheduling"]
    payload = main(["--checks", *checks, "--max-tokens", "8", "--output-dir", str(tmp_path)])
    got = {c: r["status"] for c, r in payload["checks"].items()}
    assert got == {"chunked_prefill": "pass", "preemption": "pass", "spec_decode_refused": "pass",
                   "async_scheduling": "skipped"}, payload
    assert payload["checks"]["preemption"]["guided_requests_resumed"] > 0
    assert max(payload["checks"]["chunked_prefill"]["prompt_tokens"]) > 4 * 32
    assert json.loads((tmp_path / "gpu_check.json").read_text())["all_passed"]
