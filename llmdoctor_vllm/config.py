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
import weakref
from dataclasses import dataclass, fields
from functools import cached_property

import numpy as np

CONFIG_KEY = "llmdoctor"
PREFIX = "llmdoctor_"
RULES = ("product", "delta")
DTYPES = ("float32", "float16", "bfloat16")


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


def _integer(value, name: str, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def _rule(value, name: str) -> str:
    if value not in RULES:
        raise ValueError(f"{name} must be one of {list(RULES)}, got {value!r}")
    return value


@dataclass(frozen=True, kw_only=True)
class GuidanceDefaults:
    """The settings a request may override (``llmdoctor_<name>``), each with its one default.

    ``beta`` 0.5 (METHOD's default): an operator who configures a doctor means it to steer the
    requests that name no llmdoctor argument (an OpenAI client sends none); 0 makes guidance
    opt-in per request.
    """

    alpha: float = 1.0  # weight of the patient's log-probabilities
    beta: float | dict[str, float] = 0.5  # weight of every doctor, or {doctor: weight}
    rule: str = "product"  # "product" (the paper's) or "delta" (doctor minus its reference)
    patient_min_p: float = 0.0  # guidance only among tokens with p >= this x the patient's top p


@dataclass(frozen=True, kw_only=True)
class EngineGuidance(GuidanceDefaults):
    """The ``llmdoctor`` section of ``additional_config``: the doctors, the request defaults and the
    doctor runner's settings. Every value is checked on construction (a bad one raises
    :class:`GuidanceConfigError` naming it); ``beta`` becomes one weight per doctor."""

    doctors: dict[str, str]  # name -> checkpoint path (a bare path: one doctor named "doctor")
    cache_tokens: int | None = None  # doctor KV budget per doctor model, in tokens (default: the patient's)
    block_size: int = 16
    dtype: str | None = None  # doctor dtype; default: the engine's
    prefill_chunk_tokens: int = 2048  # most tokens in one doctor forward (a longer prompt takes several)
    cuda_graphs: bool = False  # decode-only doctor steps captured as CUDA graphs (off until shown on a GPU)

    def __post_init__(self):
        try:
            self._check()
        except GuidanceConfigError:
            raise
        except ValueError as e:
            raise GuidanceConfigError(str(e)) from None

    def _check(self) -> None:
        put = object.__setattr__.__get__(self)
        doctors = {"doctor": self.doctors} if isinstance(self.doctors, str) else self.doctors
        if not isinstance(doctors, dict) or not doctors or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in doctors.items()):
            raise ValueError('llmdoctor: "doctors" must map doctor names to checkpoint paths')
        for name in doctors:
            if not name.replace("_", "").replace("-", "").isalnum():
                raise ValueError(f"llmdoctor: doctor name {name!r} must be alphanumeric (with - or _)")
        put("doctors", dict(doctors))
        put("alpha", _number(self.alpha, "llmdoctor alpha", minimum=0.0))
        if isinstance(self.beta, dict):
            unknown = set(self.beta) - set(doctors)
            if unknown:
                raise ValueError(f"llmdoctor beta names unknown doctor(s) {sorted(unknown)}")
            beta = {n: _number(self.beta.get(n, 0.0), f"llmdoctor beta[{n}]", minimum=0.0) for n in doctors}
        else:
            b = _number(self.beta, "llmdoctor beta", minimum=0.0)
            beta = {n: b for n in doctors}
        put("beta", beta)
        _rule(self.rule, "llmdoctor rule")
        put("patient_min_p", _number(self.patient_min_p, "llmdoctor patient_min_p", minimum=0.0, maximum=1.0))
        if self.cache_tokens is not None:
            _integer(self.cache_tokens, "llmdoctor cache_tokens", 16)
        _integer(self.block_size, "llmdoctor block_size", 1)
        if self.cache_tokens is not None and self.block_size > self.cache_tokens:
            raise ValueError(f"llmdoctor block_size ({self.block_size}) must not exceed cache_tokens "
                             f"({self.cache_tokens})")
        _integer(self.prefill_chunk_tokens, "llmdoctor prefill_chunk_tokens", 1)
        if not isinstance(self.cuda_graphs, bool):
            raise ValueError(f"llmdoctor cuda_graphs must be true or false, got {self.cuda_graphs!r}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"llmdoctor dtype must be float32, float16 or bfloat16, got {self.dtype!r}")

    @property
    def names(self) -> list[str]:
        return list(self.doctors)

    @cached_property
    def request_keys(self) -> frozenset[str]:
        """The ``extra_args`` keys a request may set on this engine."""
        keys = [f.name for f in fields(GuidanceDefaults)] + ["doctors"] + [f"beta_{n}" for n in self.doctors]
        return frozenset(PREFIX + k for k in keys)

    @cached_property
    def default_request(self) -> "RequestGuidance | None":
        """The guidance of a request that names no llmdoctor argument (``None``: such requests are plain)."""
        weights = np.array([self.beta[n] for n in self.doctors], dtype=np.float32)
        if not weights.any():
            return None
        return RequestGuidance(alpha=self.alpha, betas=weights, delta=self.rule == "delta",
                               patient_min_p=self.patient_min_p)

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
        known = {f.name for f in fields(cls)}
        unknown = set(raw) - known
        if unknown:
            raise GuidanceConfigError(f"llmdoctor: unknown setting(s) {sorted(unknown)}; known: {sorted(known)}")
        if "doctors" not in raw:
            raise GuidanceConfigError('llmdoctor: "doctors" must map doctor names to checkpoint paths')
        return cls(**raw)

    def request(self, extra_args: dict | None) -> "RequestGuidance | None":
        """This engine's guidance for one request; ``None`` when it is not guided.

        Raises ``ValueError`` naming the field for a bad request.
        """
        args = {k: v for k, v in (extra_args or {}).items() if k.startswith(PREFIX)}
        if not args:
            return self.default_request
        names = self.names
        for key in args:
            if key not in self.request_keys:
                if key.startswith(PREFIX + "beta_"):
                    raise ValueError(f"{key}: unknown doctor {key[len(PREFIX) + 5:]!r}; this server has {names}")
                raise ValueError(f"{key}: unknown llmdoctor argument; known: {sorted(self.request_keys)}")
        alpha = _number(args.get(PREFIX + "alpha", self.alpha), PREFIX + "alpha", minimum=0.0)
        rule = _rule(args.get(PREFIX + "rule", self.rule), PREFIX + "rule")
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


_PARSED: dict[int, tuple] = {}  # id(vllm_config) -> (weak reference to it, its EngineGuidance or None)


def engine_guidance(vllm_config) -> EngineGuidance | None:
    """The engine's parsed ``llmdoctor`` section, parsed once per engine config (not per request)."""
    key = id(vllm_config)
    hit = _PARSED.get(key)
    if hit is not None and hit[0]() is vllm_config:
        return hit[1]
    parsed = EngineGuidance.from_additional_config(getattr(vllm_config, "additional_config", None))
    try:
        ref = weakref.ref(vllm_config, lambda _, k=key: _PARSED.pop(k, None))
    except TypeError:  # not weakly referenceable: parse every time
        return parsed
    _PARSED[key] = (ref, parsed)
    return parsed


@dataclass(frozen=True)
class RequestGuidance:
    """One guided request's weights: ``alpha``, ``betas[i]`` per engine doctor, the rule, and the
    patient's support (``patient_min_p``) within which guidance reweights."""

    alpha: float
    betas: np.ndarray
    delta: bool
    patient_min_p: float = 0.0
