"""llmdoctor-vllm: steer a frozen LLM served by vLLM with a small trained doctor model.

Two public classes, two jobs:

- :class:`GuidanceProcessor` (the class ``GuidanceLogitsProcessor``) is the vLLM plugin, the
  logits processor itself. vLLM loads it from the ``vllm.logits_processors`` entry point named
  ``llmdoctor``; on the command line it is ``--logits-processors llmdoctor_vllm:GuidanceProcessor``.
- :class:`LLMdoctor` is the one-call Python API: a ``vllm.LLM`` for the patient with doctors
  plugged in (``LLMdoctor(patient_model=..., doctor_checkpoint=...).generate(...)``).

This module imports nothing heavy, because vLLM imports the plugin in its front-end process too.
"""

__version__ = "0.1.0"

__all__ = ["GuidanceProcessor", "GuidanceLogitsProcessor", "LLMdoctor", "save_doctor", "load_doctor"]


def __getattr__(name):
    if name == "LLMdoctor":
        from llmdoctor_vllm.api import LLMdoctor

        return LLMdoctor
    if name in ("GuidanceProcessor", "GuidanceLogitsProcessor"):
        from llmdoctor_vllm.processor import GuidanceLogitsProcessor

        return GuidanceLogitsProcessor
    if name in ("save_doctor", "load_doctor"):
        from llmdoctor_vllm import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
