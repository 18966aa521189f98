"""``validate_params`` as vLLM's front end calls it, for both model runners: the engine's doctors and
features are found from the ``InputProcessor`` that runs the check, so a bad request is a 400
naming the field, not a request silently left unguided."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def configs(tiny):
    from vllm.engine.arg_utils import EngineArgs

    def make(**kw):
        return EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=128, enforce_eager=True,
                          **kw).create_engine_config()

    return {"guided": make(additional_config={"llmdoctor": {"doctors": tiny["doctors"]}}), "plain": make()}


def _front_end(vllm_config, validator):
    """A vLLM ``InputProcessor`` (its class, so the lookup sees the real type) that runs ``validator``."""
    from vllm.v1.engine.input_processor import InputProcessor

    class FrontEnd(InputProcessor):
        def __init__(self, cfg):  # the parts of __init__ a params check uses
            self.vllm_config = cfg

        def admit(self, params):
            validator(params)

    return FrontEnd(vllm_config)


def _validators():
    from functools import partial

    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    # V1: entry points plus named classes; V2: the loader's validator closure (entry points + named)
    return {"v1": partial(validate_logits_processors_parameters, None),
            "v2": build_custom_logits_processors_params_validator(["llmdoctor_vllm:GuidanceProcessor"])}


@pytest.mark.parametrize("runner", ["v1", "v2"])
def test_front_end_checks_against_the_engine(configs, runner):
    from vllm import SamplingParams

    from vllm.exceptions import VLLMValidationError

    check = _validators()[runner]
    guided = _front_end(configs["guided"], check)
    guided.admit(SamplingParams(extra_args={"llmdoctor_beta_doctor0": 0.5, "llmdoctor_rule": "delta"}))
    with pytest.raises(VLLMValidationError, match="unknown doctor 'nobody'"):
        guided.admit(SamplingParams(extra_args={"llmdoctor_beta_nobody": 0.5}))
    with pytest.raises(VLLMValidationError, match="no llmdoctor doctors configured"):
        _front_end(configs["plain"], check).admit(SamplingParams(extra_args={"llmdoctor_beta": 0.5}))
    configs["guided"].speculative_config = object()
    try:
        with pytest.raises(VLLMValidationError, match="speculatively"):
            guided.admit(SamplingParams(extra_args={"llmdoctor_beta": 0.5}))
        # V1 builds no custom processor under speculative decoding: a request the engine's default
        # beta would guide is refused too, not served unguided; one that opts out is served
        with pytest.raises(VLLMValidationError, match="speculatively.*default llmdoctor beta"):
            guided.admit(SamplingParams())
        guided.admit(SamplingParams(extra_args={"llmdoctor_beta": 0}))
    finally:
        configs["guided"].speculative_config = None
    _front_end(configs["plain"], check).admit(SamplingParams())  # no llmdoctor arguments: nothing to check


def test_without_an_engine_only_shapes_are_checked():
    from vllm import SamplingParams

    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    GuidanceLogitsProcessor.validate_params(SamplingParams(extra_args={"llmdoctor_beta_x": 0.5}))
    with pytest.raises(ValueError, match="llmdoctor_beta_x"):
        GuidanceLogitsProcessor.validate_params(SamplingParams(extra_args={"llmdoctor_beta_x": "much"}))
