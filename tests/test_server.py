"""``vllm serve`` with the plugin, on 127.0.0.1, driven by the real ``openai`` client.

This is the default multi-process engine (the API server and the engine core in separate
processes), which is what production serving uses.
"""

from __future__ import annotations

import pytest

from benchmarks.common import launch_server, stop_server
from tests.helpers import sp

SERVER_ARGS = ["--max-model-len", "256", "--max-num-seqs", "4"]
CARD_ARGS = ["--logits-processor", "llmdoctor_vllm:GuidanceProcessor"]


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cfg = {"llmdoctor": {"doctors": tiny["doctors"], "beta": 0.0}}
    # the card's `vllm serve PATIENT --logits-processor llmdoctor`, as vLLM takes it (a module:Type
    # name; argparse reads --logits-processor as --logits-processors). The entry point loads the
    # class too, so vLLM builds it twice: one instance steers, the other must stay idle.
    proc, url = launch_server(tiny["patient"], cfg, log, [*SERVER_ARGS, *CARD_ARGS],
                              env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    try:
        yield url
    finally:
        stop_server(proc)


def test_card_name_maps_to_the_plugin_class():
    """``llmdoctor_vllm:GuidanceProcessor`` is what vLLM's parser and loader turn into the plugin class;
    a bare ``llmdoctor`` is refused by vLLM as an invalid FQCN."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    from vllm.v1.sample.logits_processor import _load_logitsprocs_by_fqcns

    import llmdoctor_vllm
    from llmdoctor_vllm import GuidanceLogitsProcessor, GuidanceProcessor

    assert GuidanceProcessor is GuidanceLogitsProcessor
    assert not hasattr(llmdoctor_vllm, "LLMDoctor")  # one name, not one capital apart from LLMdoctor
    names = EngineArgs.add_cli_args(FlexibleArgumentParser()).parse_args(CARD_ARGS).logits_processors
    assert _load_logitsprocs_by_fqcns(names) == [GuidanceProcessor]
    with pytest.raises(ValueError, match="Invalid logits processor FQCN 'llmdoctor'"):
        _load_logitsprocs_by_fqcns(["llmdoctor"])


PROMPT = "The cat kindly"
XARGS = {"llmdoctor_beta_doctor0": 0.8, "llmdoctor_beta_lora": 0.5, "llmdoctor_rule": "delta"}


def test_server_guided_equals_offline(server, engine):
    """Non-streaming and streaming guided completions equal the offline engine's, token for token."""
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none")
    offline = engine.generate([PROMPT], sp(guide={k[len("llmdoctor_"):]: v for k, v in XARGS.items()}, max_tokens=12),
                              use_tqdm=False)[0].outputs[0].text
    plain = engine.generate([PROMPT], sp(max_tokens=12), use_tqdm=False)[0].outputs[0].text
    r = client.completions.create(model="patient", prompt=PROMPT, max_tokens=12, temperature=0,
                                  extra_body={"vllm_xargs": XARGS})
    assert r.choices[0].text == offline != plain
    stream = client.completions.create(model="patient", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"vllm_xargs": XARGS})
    assert "".join(c.choices[0].text for c in stream) == offline
    r = client.completions.create(model="patient", prompt=PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == plain


@pytest.mark.parametrize("xargs,field", [
    ({"llmdoctor_beta_nobody": 1}, "llmdoctor_beta_nobody"),
    ({"llmdoctor_beta": "a lot"}, "llmdoctor_beta"),
    ({"llmdoctor_alpha": "NaN"}, "llmdoctor_alpha"),
    ({"llmdoctor_beta": -1}, "llmdoctor_beta"),
    ({"llmdoctor_patient_min_p": 2}, "llmdoctor_patient_min_p"),
])
def test_server_bad_request_is_400_and_server_keeps_serving(server, xargs, field):
    import openai

    client = openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="patient", prompt=PROMPT, max_tokens=4, extra_body={"vllm_xargs": xargs})
    r = client.completions.create(model="patient", prompt="A dog", max_tokens=4,
                                  extra_body={"vllm_xargs": {"llmdoctor_beta": 0.5}})
    assert r.choices[0].finish_reason in ("length", "stop")


def test_server_refuses_to_start_with_a_missing_doctor(tiny, tmp_path):
    log = tmp_path / "bad.log"
    missing = str(tmp_path / "no_such_doctor")
    with pytest.raises(RuntimeError, match="server exited"):
        launch_server(tiny["patient"], {"llmdoctor": {"doctors": {"d": missing}}}, log, SERVER_ARGS,
                      env={"VLLM_CPU_KVCACHE_SPACE": "1"})
    text = log.read_text()
    assert "no_such_doctor" in text and "no such directory" in text
