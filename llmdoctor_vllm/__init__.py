"""llmdoctor-vllm: steer a frozen LLM served by vLLM with a small trained doctor model.

The vLLM plugin is :class:`llmdoctor_vllm.processor.LLMDoctorLogitsProcessor`, registered
under the ``vllm.logits_processors`` entry point as ``llmdoctor``. This module imports
nothing heavy, because vLLM imports the plugin in its front-end process too.
"""

__version__ = "0.1.0"

__all__ = ["LLMdoctor", "LLMDoctorLogitsProcessor", "save_doctor", "load_doctor"]


def __getattr__(name):
    if name == "LLMdoctor":
        from llmdoctor_vllm.api import LLMdoctor

        return LLMdoctor
    if name == "LLMDoctorLogitsProcessor":
        from llmdoctor_vllm.processor import LLMDoctorLogitsProcessor

        return LLMDoctorLogitsProcessor
    if name in ("save_doctor", "load_doctor"):
        from llmdoctor_vllm import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(name)
