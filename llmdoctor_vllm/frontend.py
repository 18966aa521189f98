"""Request checks in vLLM's front end (``validate_params``), where a bad request becomes HTTP 400.

``validate_params`` is a classmethod that vLLM calls with the sampling params alone. To know
which doctors the engine has (and whether it decodes speculatively), :func:`engine_config_of_caller`
finds the engine config held by vLLM's ``InputProcessor``, the object that runs the check for
both model runners (V1: ``validate_logits_processors_parameters``; V2: the validator closure of
``build_custom_logits_processors_params_validator``). ``tests/test_frontend.py`` pins both call
paths of the installed vLLM. Where no such caller exists, only the arguments' shapes are checked.
"""

from __future__ import annotations

import functools
import sys

from llmdoctor_vllm.config import EngineGuidance


@functools.lru_cache(maxsize=64)
def _has_reference(path: str) -> bool:
    """Whether the checkpoint at ``path`` can serve the delta rule (read from its manifest)."""
    from llmdoctor_vllm.checkpoint import DoctorManifest

    try:
        m = DoctorManifest.read(path)
    except ValueError:
        return False
    return m.kind == "lora" or bool(m.reference)


def engine_config_of_caller(max_depth: int = 32):
    """The ``VllmConfig`` of the ``InputProcessor`` up the call stack, or ``None``."""
    try:
        from vllm.v1.engine.input_processor import InputProcessor
    except ImportError:  # pragma: no cover - a vLLM without it
        return None
    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        if isinstance(owner, InputProcessor):
            return owner.vllm_config
        frame = frame.f_back
    return None


def check_request(extra_args: dict, vllm_config) -> None:
    """Raises ``ValueError`` (HTTP 400) naming the field for llmdoctor arguments this engine cannot serve."""
    if vllm_config is None:  # no engine in sight: check the arguments' shapes against any doctor names
        names = [k[len("llmdoctor_beta_"):] for k in extra_args if k.startswith("llmdoctor_beta_")]
        EngineGuidance(doctors={n: "" for n in names} or {"doctor": ""}).request(extra_args)
        return
    engine = EngineGuidance.from_additional_config(getattr(vllm_config, "additional_config", None))
    if engine is None:
        raise ValueError("llmdoctor_* arguments given, but this server has no llmdoctor doctors configured")
    if getattr(vllm_config, "speculative_config", None) is not None:
        raise ValueError("llmdoctor_* arguments given, but this server decodes speculatively, which llmdoctor "
                         "guidance does not support; send the request without llmdoctor_* arguments")
    guidance = engine.request(extra_args)
    if guidance is not None:
        engine.check_delta_references(guidance, {n: _has_reference(p) for n, p in engine.doctors.items()})
