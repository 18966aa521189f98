"""Request checks in vLLM's front end (``validate_params``), where a bad request becomes HTTP 400.

``validate_params`` is a classmethod that vLLM calls with the sampling params alone, for every
request. To know which doctors the engine has (and whether it decodes speculatively), the engine
config is found on vLLM's ``InputProcessor`` up the call stack
(:func:`llmdoctor_vllm.vllm_internals.engine_config_of_caller`). Where no such caller exists,
only the arguments' shapes are checked. This module imports nothing heavy: it runs in the
API-server process.
"""

from __future__ import annotations

import functools

from llmdoctor_vllm.config import PREFIX, EngineGuidance, engine_guidance


@functools.lru_cache(maxsize=64)
def _has_reference(path: str) -> bool:
    """Whether the checkpoint at ``path`` can serve the delta rule (read from its manifest)."""
    from llmdoctor_vllm.checkpoint import DoctorManifest

    try:
        m = DoctorManifest.read(path)
    except ValueError:
        return False
    return m.kind == "lora" or bool(m.reference)


def check_request(extra_args: dict | None, vllm_config) -> None:
    """Raises ``ValueError`` (HTTP 400) naming the field for a request this engine cannot serve as asked.

    That is: bad ``llmdoctor_*`` arguments; any on an engine without doctors; the delta rule for a
    doctor without a reference; and, on an engine that decodes speculatively (where vLLM's V1
    runner builds no custom processor, so guidance would be silently skipped), any request that
    would be guided, by its own arguments or by the engine's default beta.
    """
    extra = extra_args or {}
    asked = any(k.startswith(PREFIX) for k in extra)
    if vllm_config is None:  # no engine in sight: check the arguments' shapes against any doctor names
        if asked:
            names = [k[len(PREFIX + "beta_"):] for k in extra if k.startswith(PREFIX + "beta_")]
            EngineGuidance(doctors={n: "" for n in names} or {"doctor": ""}).request(extra)
        return
    engine = engine_guidance(vllm_config)
    if engine is None:
        if asked:
            raise ValueError("llmdoctor_* arguments given, but this server has no llmdoctor doctors configured")
        return
    guidance = engine.request(extra)
    if guidance is None:
        return
    if getattr(vllm_config, "speculative_config", None) is not None:
        why = "it asks for llmdoctor guidance" if asked else "the server's default llmdoctor beta would guide it"
        raise ValueError(f"this server decodes speculatively, which llmdoctor guidance does not support, and {why}; "
                         "send llmdoctor_beta 0, or start the server without a speculative config or without "
                         "llmdoctor doctors")
    engine.check_delta_references(guidance, {n: _has_reference(p) for n, p in engine.doctors.items()})
