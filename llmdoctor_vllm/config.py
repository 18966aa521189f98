"""Engine-level and request-level guidance settings, parsed and checked.

Engine level: ``additional_config={"llmdoctor": {...}}`` (``--additional-config`` of ``vllm
serve``). Request level: ``SamplingParams.extra_args`` (the OpenAI server fills it from the
request body's ``vllm_xargs``, whose values are flat: strings, numbers or lists of those).

Request keys (all optional; a request that names none gets the engine defaults):
- ``llmdoctor_alpha``: weight of the patient's log-probabilities.
- ``llmdoctor_beta``: weight of every doctor the request uses.
- ``llmdoctor_beta_<doctor>``: weight of one doctor (wins over ``llmdoctor_beta``).
- ``llmdoctor_doctors``: name or list of names of the doctors to use (others get 0).
- ``llmdoctor_rule``: ``"product"`` (the paper's rule) or ``"delta"`` (doctor minus its reference).
- ``llmdoctor_patient_min_p``: guidance reweights only the tokens the patient gives at least this
  fraction of its top probability (0, the default: the full vocabulary, as the paper does).
A request whose doctor weights are all 0 is not guided at all: its output is plain vLLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

CONFIG_KEY = "llmdoctor"
PREFIX = "llmdoctor_"
RULES = ("product", "delta")
_ENGINE_KEYS = {"doctors", "alpha", "beta", "rule", "patient_min_p", "cache_tokens", "block_size", "dtype",
                "prefill_chunk_tokens", "cuda_graphs"}


class GuidanceConfigError(ValueError):
    """A bad ``--additional-config`` llmdoctor section (raised at engine start)."""


MAX_WEIGHT = 1000.0  # |alpha|, beta above this overflow float32 log-probability sums


def _number(value, name: str, *, minimum: float | None = None, maximum: float = MAX_WEIGHT) -> float:
    """A weight: a finite number (in float32 too, as the worker holds it) within ``[minimum, maximum]``
    (``maximum`` 1 for a probability fraction such as ``patient_min_p``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        x = float(value)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if minimum is not None and x < minimum:
        raise ValueError(f"{name} must be >= {minimum:g}, got {value!r}")
    if x > maximum or abs(x) > MAX_WEIGHT:
        why = " (larger weights overflow float32)" if maximum >= MAX_WEIGHT else ""
        raise ValueError(f"{name} must be at most {maximum:g}{why}, got {value!r}")
    return x


@dataclass(frozen=True)
class EngineGuidance:
    """The ``llmdoctor`` section of ``additional_config``: the doctors and the defaults."""

    doctors: dict[str, str]
    alpha: float = 1.0
    beta: dict[str, float] = field(default_factory=dict)  # default weight per doctor
    rule: str = "product"
    patient_min_p: float = 0.0  # guidance only among tokens with p >= this x the patient's top p [D]
    cache_tokens: int | None = None  # doctor KV budget per doctor model, in tokens
    block_size: int = 16
    dtype: str | None = None  # doctor dtype; default: the engine's
    prefill_chunk_tokens: int = 2048  # most tokens in one doctor forward (a longer prompt takes several)
    cuda_graphs: bool = False  # decode-only doctor steps captured as CUDA graphs (off until shown on a GPU)

    @property
    def names(self) -> list[str]:
        return list(self.doctors)

    def check_delta_references(self, guidance: "RequestGuidance", has_reference: dict[str, bool]) -> None:
        """Raises unless every doctor a delta-rule request uses has a reference."""
        if not guidance.delta:
            return
        missing = [n for n, b in zip(self.names, guidance.betas) if b > 0 and not has_reference.get(n, False)]
        if missing:
            raise ValueError(f"{PREFIX}rule: 'delta' needs a reference model, and doctor(s) {missing} have none "
                             "(a full doctor names one in its manifest; LoRA doctors always have one)")

    @classmethod
    def from_additional_config(cls, additional_config: dict | None) -> "EngineGuidance | None":
        """Parses the section; ``None`` when the plugin is not configured for this engine."""
        raw = (additional_config or {}).get(CONFIG_KEY)
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise GuidanceConfigError(f"additional_config['{CONFIG_KEY}'] must be an object, got {raw!r}")
        unknown = set(raw) - _ENGINE_KEYS
        if unknown:
            raise GuidanceConfigError(f"llmdoctor: unknown setting(s) {sorted(unknown)}; known: {sorted(_ENGINE_KEYS)}")
        doctors = raw.get("doctors")
        if isinstance(doctors, str):
            doctors = {"doctor": doctors}
        if not isinstance(doctors, dict) or not doctors or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in doctors.items()):
            raise GuidanceConfigError('llmdoctor: "doctors" must map doctor names to checkpoint paths')
        for name in doctors:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise GuidanceConfigError(f"llmdoctor: doctor name {name!r} must be alphanumeric (with - or _)")
        try:
            alpha = _number(raw.get("alpha", 1.0), "llmdoctor alpha", minimum=0.0)
            beta_raw = raw.get("beta", 0.5)
            if isinstance(beta_raw, dict):
                unknown_b = set(beta_raw) - set(doctors)
                if unknown_b:
                    raise ValueError(f"llmdoctor beta names unknown doctor(s) {sorted(unknown_b)}")
                beta = {n: _number(beta_raw.get(n, 0.0), f"llmdoctor beta[{n}]", minimum=0.0) for n in doctors}
            else:
                b = _number(beta_raw, "llmdoctor beta", minimum=0.0)
                beta = {n: b for n in doctors}
            rule = raw.get("rule", "product")
            if rule not in RULES:
                raise ValueError(f"llmdoctor rule must be one of {RULES}, got {rule!r}")
            patient_min_p = _number(raw.get("patient_min_p", 0.0), "llmdoctor patient_min_p", minimum=0.0,
                                    maximum=1.0)
            cache_tokens = raw.get("cache_tokens")
            if cache_tokens is not None and (not isinstance(cache_tokens, int) or isinstance(cache_tokens, bool)
                                             or cache_tokens < 16):
                raise ValueError(f"llmdoctor cache_tokens must be an integer >= 16, got {cache_tokens!r}")
            block_size = raw.get("block_size", 16)
            if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
                raise ValueError(f"llmdoctor block_size must be a positive integer, got {block_size!r}")
            if cache_tokens is not None and block_size > cache_tokens:
                raise ValueError(f"llmdoctor block_size ({block_size}) must not exceed cache_tokens ({cache_tokens})")
            chunk = raw.get("prefill_chunk_tokens", 2048)
            if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
                raise ValueError(f"llmdoctor prefill_chunk_tokens must be a positive integer, got {chunk!r}")
            graphs = raw.get("cuda_graphs", False)
            if not isinstance(graphs, bool):
                raise ValueError(f"llmdoctor cuda_graphs must be true or false, got {graphs!r}")
            dtype = raw.get("dtype")
            if dtype is not None and dtype not in ("float32", "float16", "bfloat16"):
                raise ValueError(f"llmdoctor dtype must be float32, float16 or bfloat16, got {dtype!r}")
        except ValueError as e:
            raise GuidanceConfigError(str(e)) from None
        return cls(doctors=dict(doctors), alpha=alpha, beta=beta, rule=rule, patient_min_p=patient_min_p,
                   cache_tokens=cache_tokens, block_size=block_size, dtype=dtype, prefill_chunk_tokens=chunk,
                   cuda_graphs=graphs)

    def request(self, extra_args: dict | None) -> "RequestGuidance | None":
        """This engine's guidance for one request; ``None`` when it is not guided.

        Raises ``ValueError`` naming the field for a bad request.
        """
        args = {k: v for k, v in (extra_args or {}).items() if k.startswith(PREFIX)}
        names = self.names
        known = {"alpha", "beta", "doctors", "rule", "patient_min_p"} | {f"beta_{n}" for n in names}
        for key in args:
            if key[len(PREFIX):] not in known:
                if key.startswith(PREFIX + "beta_"):
                    raise ValueError(f"{key}: unknown doctor {key[len(PREFIX) + 5:]!r}; this server has {names}")
                raise ValueError(f"{key}: unknown llmdoctor argument; known: {sorted(PREFIX + k for k in known)}")
        alpha = _number(args.get(PREFIX + "alpha", self.alpha), PREFIX + "alpha", minimum=0.0)
        rule = args.get(PREFIX + "rule", self.rule)
        if rule not in RULES:
            raise ValueError(f"{PREFIX}rule must be one of {list(RULES)}, got {rule!r}")
        min_p = _number(args.get(PREFIX + "patient_min_p", self.patient_min_p), PREFIX + "patient_min_p",
                        minimum=0.0, maximum=1.0)
        chosen = args.get(PREFIX + "doctors")
        if chosen is not None:
            chosen = [chosen] if isinstance(chosen, str) else chosen
            if not isinstance(chosen, list) or not chosen or not all(isinstance(c, str) for c in chosen):
                raise ValueError(f"{PREFIX}doctors must be a doctor name or a non-empty list of names, got {chosen!r}")
            bad = [c for c in chosen if c not in self.doctors]
            if bad:
                raise ValueError(f"{PREFIX}doctors: unknown doctor(s) {bad}; this server has {names}")
            if len(set(chosen)) != len(chosen):
                raise ValueError(f"{PREFIX}doctors lists a doctor twice: {chosen}")
        if PREFIX + "beta" in args:
            base = _number(args[PREFIX + "beta"], PREFIX + "beta", minimum=0.0)
            betas = {n: base for n in names}
        else:
            betas = dict(self.beta)
        for n in names:
            key = f"{PREFIX}beta_{n}"
            if key in args:
                betas[n] = _number(args[key], key, minimum=0.0)
        if chosen is not None:
            betas = {n: (betas[n] if n in chosen else 0.0) for n in names}
        weights = np.array([betas[n] for n in names], dtype=np.float32)
        if not weights.any():
            return None
        return RequestGuidance(alpha=alpha, betas=weights, delta=(rule == "delta"), patient_min_p=min_p)


@dataclass(frozen=True)
class RequestGuidance:
    """One guided request's weights: ``alpha``, ``betas[i]`` per engine doctor, the rule, and the
    patient's support (``patient_min_p``) within which guidance reweights."""

    alpha: float
    betas: np.ndarray
    delta: bool
    patient_min_p: float = 0.0
