"""Engine-level behaviour: preemption, start-up errors, the LLMdoctor API, an unconfigured plugin."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import ENGINE_KW
from test_offline import PROMPTS, run, sp


def test_preempted_requests_are_rebuilt_and_match(tiny, engine):
    """With a KV cache too small for the batch, vLLM preempts; guided outputs do not change."""
    from vllm import LLM

    from llmdoctor_vllm.processor import active_processors

    kw = dict(ENGINE_KW, kv_cache_memory_bytes=96 * 1024, max_model_len=64, block_size=32, max_num_seqs=4)
    cfg = {"llmdoctor": {"doctors": tiny["doctors"], "beta": 0.0}}
    small = LLM(model=tiny["patient"], additional_config=cfg, **kw)
    params = [sp(guide={"beta_doctor0": 0.8, "beta_lora": 0.5, "rule": "delta"}, max_tokens=40, temperature=t, seed=3)
              for t in (0.0, 1.0)] * 2
    prompts = PROMPTS
    got, _ = run(small, prompts, params)
    proc = [p for p in active_processors() if p.vllm_config is small.llm_engine.vllm_config][0]
    assert proc.core.resumed > 0, "the KV budget did not force a preemption"
    want = [run(engine, [p], [q])[0][0] for p, q in zip(prompts, params)]
    assert got == want
    del small


def _start(tiny, doctors, **extra):
    from vllm import LLM

    return LLM(model=tiny["patient"], additional_config={"llmdoctor": {"doctors": doctors, **extra}}, **ENGINE_KW)


def test_startup_errors_name_the_path_and_problem(tiny, tmp_path):
    good = tiny["doctors"]["doctor0"]
    missing = str(tmp_path / "nowhere")
    with pytest.raises(Exception, match="nowhere.*no such directory"):
        _start(tiny, {"d": missing})

    wrong_version = tmp_path / "v99"
    shutil.copytree(good, wrong_version)
    manifest = json.loads((wrong_version / "llmdoctor.json").read_text())
    manifest["format_version"] = 99
    (wrong_version / "llmdoctor.json").write_text(json.dumps(manifest))
    with pytest.raises(Exception, match="v99.*unsupported format version 99"):
        _start(tiny, {"d": str(wrong_version)})

    corrupt = tmp_path / "corrupt"
    shutil.copytree(good, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(Exception, match="corrupt.*cannot load model weights"):
        _start(tiny, {"d": str(corrupt)})

    # a doctor trained with another tokenizer: same size, different token meanings
    from llmdoctor_vllm.toy import build_tiny_doctor, build_tokenizer, toy_corpus

    other_tok = build_tokenizer(toy_corpus(seed=5)[::-1] + ["zebra quartz"] * 20)
    other = build_tiny_doctor(other_tok, tmp_path / "other_tok")
    with pytest.raises(Exception, match="other_tok.*not the patient's"):
        _start(tiny, {"d": other})

    with pytest.raises(Exception, match="unknown setting"):
        _start(tiny, {"d": good}, betta=1)


def test_llmdoctor_api(tiny, engine):
    """``LLMdoctor(...).generate`` builds a configured engine; beta=0 is the plain patient."""
    from llmdoctor_vllm import LLMdoctor

    kw = {k: v for k, v in ENGINE_KW.items() if k != "logprobs_mode"}
    doc = LLMdoctor(patient_model=tiny["patient"], doctor_checkpoint=tiny["doctors"]["doctor0"], alpha=1.0, beta=0.8,
                    **kw)
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


def test_unconfigured_plugin_does_nothing(tiny, engine):
    """Installed but not configured: no doctor loaded, outputs are plain vLLM's."""
    from vllm import LLM

    from llmdoctor_vllm.processor import active_processors

    kw = {k: v for k, v in ENGINE_KW.items() if k != "logprobs_mode"}
    bare = LLM(model=tiny["patient"], **kw)
    assert not [p for p in active_processors() if p.vllm_config is bare.llm_engine.vllm_config]
    greedy = sp(max_tokens=8)
    assert run(bare, PROMPTS, greedy)[0] == run(engine, PROMPTS, greedy)[0]
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match="no llmdoctor doctors configured"):
        bare.generate(["x"], sp(guide={"beta": 1.0}), use_tqdm=False)
