"""The real model: SmolLM2-135M-Instruct, converted from its PyPI package's GGUF, served by vLLM with the
plugin and the packaged positive-sentiment LoRA doctor. Guided greedy decoding is checked against the
formula recomputed with transformers, and one guided chat request goes through ``vllm serve``."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import guided_scores

PROMPTS = ["Write two sentences about a visit to the optician.", "Describe a delayed flight in two sentences."]
MAX_TOKENS = 10


@pytest.fixture(scope="module")
def smollm2():
    """The converted patient folder (converted here on first use, reused from the cache after)."""
    from llmdoctor_train.real.smollm2 import materialize_smollm2

    return str(materialize_smollm2())


@pytest.fixture(scope="module")
def doctor(smollm2):
    """The packaged doctor, made loadable for this patient."""
    from llmdoctor_train.real.doctor import positive_doctor

    return str(positive_doctor(smollm2))


@pytest.fixture(scope="module")
def real_engine(smollm2, doctor, keep_alive):
    from vllm import LLM

    from llmdoctor_train.real.engine import engine_kwargs

    llm = LLM(model=smollm2, additional_config={"llmdoctor": {"doctors": {"positive": doctor}, "beta": 0.0}},
              **engine_kwargs(max_model_len=256, max_num_seqs=4, kv_cache_memory_bytes=64 << 20,
                              logprobs_mode="processed_logprobs"))
    keep_alive(llm)
    return llm


def _chat(llm, xargs=None, **kw):
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, extra_args=xargs, **kw)
    return llm.chat([[{"role": "user", "content": p}] for p in PROMPTS], params, use_tqdm=False)


def test_conversion_gives_a_chat_model(smollm2, tmp_path):
    """The converted folder is a plain float32 Llama with the ChatML template and <|im_end|> as EOS; an
    unconverted cache names the command that converts it."""
    from transformers import AutoConfig, AutoTokenizer

    from llmdoctor_train.real.smollm2 import MissingModelError, smollm2_path

    config = AutoConfig.from_pretrained(smollm2)
    tok = AutoTokenizer.from_pretrained(smollm2)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert "quantization_config" not in config.to_dict()
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    with pytest.raises(MissingModelError, match="llmdoctor smollm2"):
        smollm2_path(tmp_path / "empty")


def test_engine_uses_the_chat_template(real_engine, smollm2):
    """``LLM.chat`` feeds the patient exactly its tokenizer's chat template, generation prompt included."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2)
    for prompt, out in zip(PROMPTS, _chat(real_engine)):
        want = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
        assert list(out.prompt_token_ids) == list(want)
        assert tok.decode(out.prompt_token_ids).endswith("<|im_start|>assistant\n")
        assert out.outputs[0].text.strip()


@pytest.fixture(scope="module")
def hf_real(smollm2, doctor):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmdoctor_vllm.checkpoint import load_doctor

    tok = AutoTokenizer.from_pretrained(smollm2)
    patient = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    return patient, {"positive": load_doctor(doctor, patient_tokenizer=tok)}


@pytest.mark.parametrize("rule,beta", [("product", 1.5), ("delta", 3.0)])
def test_guided_greedy_matches_formula(real_engine, hf_real, rule, beta):
    """Guided greedy decoding with the LoRA doctor follows alpha*log p + beta*log d (product) or
    beta*(log d - log d_ref) (delta, the adapter switched off as the reference), recomputed with
    transformers by teacher forcing; its log-probs match, and guidance changes the reply."""
    patient, doctors = hf_real
    guided = _chat(real_engine, {"llmdoctor_beta": beta, "llmdoctor_rule": rule}, logprobs=0)
    plain = _chat(real_engine)
    assert [o.outputs[0].token_ids for o in guided] != [o.outputs[0].token_ids for o in plain]
    for o in guided:
        toks = list(o.outputs[0].token_ids)
        ref = guided_scores(patient, doctors, list(o.prompt_token_ids), toks, betas={"positive": beta}, rule=rule)
        assert toks == ref.argmax(-1).tolist()
        got = torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, toks)])
        want = torch.log_softmax(ref, -1)[torch.arange(len(toks)), torch.tensor(toks)]
        torch.testing.assert_close(got, want, atol=2e-3, rtol=1e-3)


def test_guided_chat_through_the_server(smollm2, doctor, real_engine, tmp_path):
    """``vllm serve`` with the plugin and the doctor answers a guided chat request from the real openai
    client, with the offline engine's reply."""
    import openai

    from benchmarks.common import launch_server, stop_server

    cfg = {"llmdoctor": {"doctors": {"positive": doctor}, "beta": 0.0}}
    proc, url = launch_server(smollm2, cfg, tmp_path / "serve.log", ["--max-model-len", "256", "--max-num-seqs", "4"],
                              env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        xargs = {"llmdoctor_beta": 1.5}
        r = client.chat.completions.create(model="patient", messages=[{"role": "user", "content": PROMPTS[0]}],
                                           max_tokens=MAX_TOKENS, temperature=0, extra_body={"vllm_xargs": xargs})
    finally:
        stop_server(proc)
    offline = _chat(real_engine, xargs)[0].outputs[0].text
    assert r.choices[0].message.content == offline and offline.strip()
