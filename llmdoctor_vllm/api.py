"""``LLMdoctor``: a vLLM engine for a patient, with doctors plugged in, in one call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from os import PathLike


def close_engine(llm) -> None:
    """Shuts a ``vllm.LLM`` down now and waits for its output thread, so the process exits cleanly.

    The multi-process client's output thread holds the last outputs it decoded (tensors made
    with ``torch.frombuffer``). If it is still unwinding when the interpreter finalises, freeing
    them aborts the process (SIGABRT, "terminate called without an active exception") after all
    work is done; shutting down and joining the thread first avoids that.
    """
    from llmdoctor_vllm.vllm_internals import join_output_thread

    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is None:
        return
    core.shutdown()
    join_output_thread(core)


class LLMdoctor:
    """A patient served by ``vllm.LLM`` and steered by one or more doctors.

    ``doctor_checkpoint`` is a checkpoint path or a ``{name: path}`` mapping; ``alpha``, ``beta``,
    ``rule`` and ``patient_min_p`` are the defaults of every request (``generate`` takes per-call
    overrides); one left out keeps the engine setting's default
    (:class:`~llmdoctor_vllm.config.GuidanceDefaults`).
    Other keyword arguments go to ``vllm.LLM``. Use it as a context manager (or call
    ``close()``) to shut the engine down when done.
    """

    def __init__(self, patient_model: str | PathLike, doctor_checkpoint: str | PathLike | Mapping[str, str],
                 alpha: float | None = None, beta: float | Mapping[str, float] | None = None,
                 rule: str | None = None, patient_min_p: float | None = None, **llm_kwargs):
        from vllm import LLM

        doctors = ({str(k): str(v) for k, v in doctor_checkpoint.items()} if isinstance(doctor_checkpoint, Mapping)
                   else {"doctor": str(doctor_checkpoint)})
        beta = dict(beta) if isinstance(beta, Mapping) else beta
        additional = dict(llm_kwargs.pop("additional_config", None) or {})
        given = {"alpha": alpha, "beta": beta, "rule": rule, "patient_min_p": patient_min_p}
        additional["llmdoctor"] = {"doctors": doctors, **{k: v for k, v in given.items() if v is not None}}
        self.doctors = list(doctors)
        self.llm = LLM(model=str(patient_model), additional_config=additional, **llm_kwargs)

    def generate(self, prompts: str | Sequence[str], sampling_params=None, *, alpha: float | None = None,
                 beta: float | None = None, rule: str | None = None, patient_min_p: float | None = None,
                 **kwargs) -> list[str]:
        """Guided completions of ``prompts`` (texts); ``beta=0`` gives the plain patient's."""
        from vllm import SamplingParams

        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        sp = sampling_params.clone() if sampling_params is not None else SamplingParams(max_tokens=128)
        extra = dict(sp.extra_args or {})
        for key, value in (("alpha", alpha), ("beta", beta), ("rule", rule), ("patient_min_p", patient_min_p)):
            if value is not None:
                extra[f"llmdoctor_{key}"] = value
        sp.extra_args = extra or None
        outs = self.llm.generate(prompts, sp, **kwargs)
        texts = [o.outputs[0].text for o in outs]
        return texts[0] if single else texts

    def close(self) -> None:
        """Shuts the engine down (see ``close_engine``); the object is unusable afterwards."""
        close_engine(self.llm)

    def __enter__(self) -> LLMdoctor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
