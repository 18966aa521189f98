"""The short form of ``benchmarks/soak.py``: a real server under concurrent load and faults."""

from __future__ import annotations


def test_soak_two_short_rounds(tmp_path):
    from benchmarks.soak import run_soak

    result = run_soak(rounds=2, n_requests=40, workdir=tmp_path)
    for r in result["rounds"]:
        assert r["lost"] == 0, r["errors"]
        assert r["rejected_400"] == r["bad_sent"] > 0  # every bad request: HTTP 400 naming the field
        assert r["wrongly_rejected_or_accepted"] == 0
        assert r["completed"] + r["aborted"] + r["rejected_400"] == r["sent"]
        assert r["compared"] > 10 and r["mismatches_vs_offline"] == 0, r["mismatched_ids"]
        assert r["long_prompts_compared"] > 0  # prompts longer than the token budget, chunked
        assert r["guided_requests_after"] == 0
        assert all(v == {"streams": 0, "blocks": 0} for v in r["doctor_cache_after"].values())
    assert sum(r["aborted"] for r in result["rounds"]) > 0
    assert result["rounds"][-1]["preempted_and_resumed_total"] > 0  # the KV budget forced preemption
    second = result["rounds"][1]
    assert second["server_rss_mb_end"] - second["server_rss_mb_start"] < 100
