"""Engine-level behaviour: preemption, start-up errors, the LLMdoctor API, an unconfigured plugin."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.helpers import ENGINE_KW, PROMPTS, run, sp


def test_preempted_requests_are_rebuilt_and_match(tiny, engine, keep_alive):
    """With a KV cache too small for the batch, vLLM preempts; guided outputs do not change."""
    from vllm import LLM

    from llmdoctor_vllm.processor import active_processors

    kw = dict(ENGINE_KW, kv_cache_memory_bytes=96 * 1024, max_model_len=64, block_size=32, max_num_seqs=4)
    cfg = {"llmdoctor": {"doctors": tiny["doctors"], "beta": 0.0}}
    small = LLM(model=tiny["patient"], additional_config=cfg, **kw)
    keep_alive(small)
    params = [sp(guide={"beta_doctor0": 0.8, "beta_lora": 0.5, "rule": "delta"}, max_tokens=40, temperature=t, seed=3)
              for t in (0.0, 1.0)] * 2
    prompts = PROMPTS
    got, _ = run(small, prompts, params)
    proc = [p for p in active_processors() if p.vllm_config is small.llm_engine.vllm_config][0]
    assert proc.core.resumed > 0, "the KV budget did not force a preemption"
    want = [run(engine, [p], [q])[0][0] for p, q in zip(prompts, params)]
    assert got == want


def _start(tiny, doctors, **extra):
    from vllm import LLM

    return LLM(model=tiny["patient"], additional_config={"llmdoctor": {"doctors": doctors, **extra}}, **ENGINE_KW)


_PROBE = """
import json, os, sys
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
from vllm import LLM
patient, cases, kw = json.loads(sys.argv[1])
for cfg in cases:
    try:
        LLM(model=patient, additional_config={"llmdoctor": cfg}, **kw)
        print(json.dumps("started"))
    except Exception as e:  # the message a user sees
        print(json.dumps(f"{type(e).__name__}: {e} {e.__cause__ or ''}"))
"""


def _startup_messages(tiny, configs: list[dict]) -> list[str]:
    """Start an engine per config in a fresh process (a failed start tears down vLLM's process state)."""
    import subprocess
    import sys

    payload = json.dumps([tiny["patient"], configs, ENGINE_KW])
    out = subprocess.run([sys.executable, "-c", _PROBE, payload], capture_output=True, text=True, timeout=600)
    lines = [json.loads(x) for x in out.stdout.splitlines() if x.startswith('"')]
    assert len(lines) == len(configs), out.stderr[-3000:]
    return lines


def test_startup_errors_name_the_path_and_problem(tiny, tmp_path):
    good = tiny["doctors"]["doctor0"]
    missing = str(tmp_path / "nowhere")

    wrong_version = tmp_path / "v99"
    shutil.copytree(good, wrong_version)
    manifest = json.loads((wrong_version / "llmdoctor.json").read_text())
    manifest["format_version"] = 99
    (wrong_version / "llmdoctor.json").write_text(json.dumps(manifest))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")

    # a doctor trained with another tokenizer: same size, different token meanings
    from llmdoctor_train.toy.models import build_tiny_doctor, build_tokenizer, tokenizer_corpus

    other_tok = build_tokenizer(tokenizer_corpus(seed=5)[::-1] + ["zebra quartz"] * 20)
    other = build_tiny_doctor(other_tok, tmp_path / "other_tok")
    no_ref = build_tiny_doctor(tiny["tokenizer"], tmp_path / "no_ref")

    not_object = tmp_path / "list_manifest"
    shutil.copytree(good, not_object)
    (not_object / "llmdoctor.json").write_text("[1, 2]")
    a_file = tmp_path / "a_file.json"
    a_file.write_text("{}")
    sliding = tmp_path / "sliding"  # an architecture the runner does not drive
    shutil.copytree(good, sliding)
    config = json.loads((sliding / "config.json").read_text())
    config.update(use_sliding_window=True, sliding_window=8, max_window_layers=0)
    (sliding / "config.json").write_text(json.dumps(config))

    cases = [
        ({"doctors": {"d": missing}}, "nowhere.*no such directory"),
        ({"doctors": {"d": str(wrong_version)}}, "v99.*unsupported format version 99"),
        ({"doctors": {"d": str(corrupt)}}, "corrupt.*cannot load model weights"),
        ({"doctors": {"d": other}}, "other_tok.*not the patient's"),
        ({"doctors": {"d": good}, "betta": 1}, "unknown setting"),
        ({"doctors": {"d": no_ref}, "rule": "delta"}, "no_ref.*delta rule needs a reference"),
        ({"doctors": {"d": str(not_object)}}, "list_manifest.*must hold a JSON object"),
        ({"doctors": {"d": str(a_file)}}, "a_file.json.*is a file"),
        ({"doctors": {"d": str(sliding)}}, "sliding.*sliding-window attention"),
        ({"doctors": {"d": good}, "block_size": 64, "cache_tokens": 32}, "block_size.*cache_tokens"),
        ({"doctors": {"d": good}, "cache_tokens": 10**15}, "started"),  # capped at what the engine can use
        ({"doctors": {"d": good}}, "started"),
    ]
    import re

    for (cfg, pattern), msg in zip(cases, _startup_messages(tiny, [c for c, _ in cases])):
        assert re.search(pattern, msg, re.S), (pattern, msg)


def test_llmdoctor_api(tiny, engine, keep_alive):
    """``LLMdoctor(...).generate`` builds a configured engine; beta=0 is the plain patient."""
    from llmdoctor_vllm import LLMdoctor

    kw = {k: v for k, v in ENGINE_KW.items() if k != "logprobs_mode"}
    doc = LLMdoctor(patient_model=tiny["patient"], doctor_checkpoint=tiny["doctors"]["doctor0"], alpha=1.0, beta=0.8,
                    **kw)
    keep_alive(doc)
    from vllm import SamplingParams

    greedy = SamplingParams(max_tokens=10, temperature=0)
    guided = doc.generate(PROMPTS, greedy)
    plain = doc.generate(PROMPTS, greedy, beta=0.0)
    ref_plain = [o.outputs[0].text for o in engine.generate(PROMPTS, greedy, use_tqdm=False)]
    ref_guided = [o.outputs[0].text for o in engine.generate(
        PROMPTS, sp(guide={"beta_doctor0": 0.8}, max_tokens=10), use_tqdm=False)]
    assert plain == ref_plain
    assert guided == ref_guided != plain
    assert isinstance(doc.generate("The cat", greedy), str)
    # a per-call patient_min_p reaches the request: 1 leaves the patient's top token whatever beta is
    masked = doc.generate(PROMPTS, greedy, beta=3.0, patient_min_p=1.0)
    ref_masked = [o.outputs[0].text for o in engine.generate(
        PROMPTS, sp(guide={"beta_doctor1": 0.5, "doctors": "doctor1", "patient_min_p": 1.0}, max_tokens=10),
        use_tqdm=False)]
    assert masked == ref_masked != doc.generate(PROMPTS, greedy, beta=3.0)


def test_unconfigured_plugin_does_nothing(tiny, engine, keep_alive):
    """Installed but not configured: no doctor loaded, outputs are plain vLLM's."""
    from vllm import LLM

    from llmdoctor_vllm.processor import active_processors

    kw = {k: v for k, v in ENGINE_KW.items() if k != "logprobs_mode"}
    bare = LLM(model=tiny["patient"], **kw)
    keep_alive(bare)
    assert not [p for p in active_processors() if p.vllm_config is bare.llm_engine.vllm_config]
    greedy = sp(max_tokens=8)
    assert run(bare, PROMPTS, greedy)[0] == run(engine, PROMPTS, greedy)[0]
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match="no llmdoctor doctors configured"):
        bare.generate(["x"], sp(guide={"beta": 1.0}), use_tqdm=False)


def test_delta_rule_needs_a_reference(tiny, tmp_path, keep_alive):
    """A full doctor whose manifest names no reference serves the product rule; delta is refused."""
    from vllm.exceptions import VLLMValidationError

    from llmdoctor_train.toy.models import build_tiny_doctor

    bare = build_tiny_doctor(tiny["tokenizer"], tmp_path / "no_ref")
    llm = _start(tiny, {"d": bare}, beta=0.0)
    keep_alive(llm)
    with pytest.raises((ValueError, VLLMValidationError), match="llmdoctor_rule.*reference"):
        llm.generate(["The cat"], sp(guide={"beta": 1.0, "rule": "delta"}), use_tqdm=False)
    assert len(run(llm, ["The cat"], sp(guide={"beta": 1.0}, max_tokens=5))[0][0]) == 5


def test_failing_doctor_falls_back_to_plain_for_its_requests(tiny, engine, monkeypatch):
    """A doctor forward that raises or returns NaN unguides only the requests it was steering."""
    from llmdoctor_vllm.processor import active_processors
    from llmdoctor_vllm.runner import DoctorRunner

    proc = [p for p in active_processors() if p.vllm_config is engine.llm_engine.vllm_config][0]
    plain = run(engine, PROMPTS[:2], sp(max_tokens=8))[0]
    real_step = DoctorRunner.step
    lora_runner = proc.core.doctors[2].runner

    def faulty(self, *a, **k):
        out = real_step(self, *a, **k)
        if self is lora_runner:
            raise RuntimeError("injected fault")
        return out

    monkeypatch.setattr(DoctorRunner, "step", faulty)
    got = run(engine, PROMPTS[:2], [sp(guide={"beta_lora": 1.0}, max_tokens=8),
                                     sp(guide={"beta_doctor0": 1.0}, max_tokens=8)])[0]
    assert got[0] == plain[0]  # its doctor failed: plain decoding
    monkeypatch.setattr(DoctorRunner, "step", real_step)
    assert got[1] == run(engine, PROMPTS[1:2], sp(guide={"beta_doctor0": 1.0}, max_tokens=8))[0][0] != plain[1]

    def nan_step(self, *a, **k):
        return real_step(self, *a, **k) * float("nan")

    monkeypatch.setattr(DoctorRunner, "step", nan_step)
    assert run(engine, PROMPTS[:1], sp(guide={"beta_doctor0": 1.0}, max_tokens=8))[0] == plain[:1]


def test_request_past_the_doctor_cache_budget_continues_unguided(tiny, engine, keep_alive, caplog):
    """A request that outgrows the doctor's KV budget is logged and finishes unguided; others are steered."""
    import logging

    from llmdoctor_vllm.processor import active_processors

    llm = _start(tiny, {"d": tiny["doctors"]["doctor0"]}, beta=0.0, cache_tokens=32)
    keep_alive(llm)
    guide = {"beta": 1.0}
    with caplog.at_level(logging.WARNING, logger="llmdoctor_vllm"):
        long_out = run(llm, [PROMPTS[0]], sp(guide=guide, max_tokens=40))[0][0]
    assert len(long_out) == 40
    assert any("KV cache full" in r.getMessage() for r in caplog.records)
    short = run(llm, [PROMPTS[1]], sp(guide=guide, max_tokens=8))[0][0]
    assert short == run(engine, [PROMPTS[1]], sp(guide={"beta_doctor0": 1.0}, max_tokens=8))[0][0]
    proc = [p for p in active_processors() if p.vllm_config is llm.llm_engine.vllm_config][0]
    run(llm, ["x"], sp(max_tokens=1))
    assert proc.core.occupancy()["d"] == {"streams": 0, "blocks": 0}
