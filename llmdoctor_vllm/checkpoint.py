"""The doctor checkpoint: one writer and one loader for the plugin, the trainer and benchmarks.

A checkpoint is an HF folder holding
- the doctor LM: full weights (``config.json`` + safetensors), or a peft LoRA adapter whose
  base model the manifest names;
- the value head (``value_head.safetensors``);
- the doctor's tokenizer files;
- ``llmdoctor.json``, the manifest: format version, head shape, tokenizer fingerprint, what
  the doctor was trained for, and its reference for the delta rule.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from llmdoctor_vllm.value_head import ValueHead

MANIFEST_NAME = "llmdoctor.json"
VALUE_HEAD_NAME = "value_head.safetensors"
FORMAT_VERSION = 1


class DoctorCheckpointError(ValueError):
    """A doctor checkpoint is missing, malformed, or does not fit the patient."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(f"llmdoctor: doctor checkpoint {os.fspath(path)!r}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what every token id means, so two tokenizers can be compared by manifest."""
    vocab = tokenizer.get_vocab()
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    digest = hashlib.sha256(json.dumps(items, ensure_ascii=False).encode("utf-8"))
    return digest.hexdigest()


@dataclass
class DoctorManifest:
    """The contents of ``llmdoctor.json``."""

    kind: str  # "full" or "lora"
    hidden_size: int
    value_head_inner_size: int
    tokenizer_fingerprint: str
    tokenizer_size: int
    vocab_width: int
    base_model: str | None = None  # LoRA: the model the adapter applies to
    reference: str | None = None  # full: the starting weights, for the delta rule
    trained_for: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "llmdoctor-doctor",
            "format_version": self.format_version,
            "kind": self.kind,
            "value_head": {
                "file": VALUE_HEAD_NAME,
                "hidden_size": self.hidden_size,
                "inner_size": self.value_head_inner_size,
            },
            "tokenizer": {"fingerprint": self.tokenizer_fingerprint, "size": self.tokenizer_size},
            "vocab_width": self.vocab_width,
            "base_model": self.base_model,
            "reference": self.reference,
            "trained_for": self.trained_for,
            "extra": self.extra,
        }

    @classmethod
    def read(cls, path: str | os.PathLike) -> "DoctorManifest":
        """Reads and checks ``llmdoctor.json`` of the checkpoint folder ``path``."""
        folder = Path(path)
        if folder.is_file():
            raise DoctorCheckpointError(path, "is a file; a doctor checkpoint is the folder save_doctor wrote")
        if not folder.is_dir():
            raise DoctorCheckpointError(path, "no such directory")
        mpath = folder / MANIFEST_NAME
        if not mpath.is_file():
            raise DoctorCheckpointError(path, f"missing {MANIFEST_NAME} (not a doctor checkpoint?)")
        try:
            raw = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise DoctorCheckpointError(path, f"{MANIFEST_NAME} is not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise DoctorCheckpointError(path, f"{MANIFEST_NAME} must hold a JSON object, got {type(raw).__name__}")
        version = raw.get("format_version")
        if raw.get("format") != "llmdoctor-doctor" or version != FORMAT_VERSION:
            raise DoctorCheckpointError(
                path, f"unsupported format version {version!r} (this llmdoctor-vllm reads {FORMAT_VERSION})"
            )
        try:
            head, tok = raw["value_head"], raw["tokenizer"]
            manifest = cls(
                kind=raw["kind"],
                hidden_size=int(head["hidden_size"]),
                value_head_inner_size=int(head["inner_size"]),
                tokenizer_fingerprint=tok["fingerprint"],
                tokenizer_size=int(tok["size"]),
                vocab_width=int(raw["vocab_width"]),
                base_model=raw.get("base_model"),
                reference=raw.get("reference"),
                trained_for=raw.get("trained_for", ""),
                extra=raw.get("extra", {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise DoctorCheckpointError(path, f"{MANIFEST_NAME} lacks or mangles field {e}") from None
        if manifest.kind not in ("full", "lora"):
            raise DoctorCheckpointError(path, f"unknown kind {manifest.kind!r} in {MANIFEST_NAME}")
        if manifest.kind == "lora" and not manifest.base_model:
            raise DoctorCheckpointError(path, "a LoRA doctor's manifest must name its base_model")
        return manifest

    def resolve(self, folder: str | os.PathLike, ref: str | None) -> str | None:
        """A path in the manifest, relative to the checkpoint folder unless absolute."""
        if ref is None:
            return None
        p = Path(ref)
        return str(p if p.is_absolute() else (Path(folder) / p).resolve())


def _reloaded_tokenizer(folder: Path, tokenizer):
    """The tokenizer as it loads back from ``folder``, as a patient's loads from its own: loading can add
    tokens (a tokenizer saved beside a Qwen2 config reloads with an added unk), and the fingerprint must
    match the reloaded patient's. Falls back to ``tokenizer`` if the folder's does not load."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001 - e.g. a tokenizer class that needs a file not written
        return tokenizer


def save_doctor(
    path: str | os.PathLike,
    model,
    tokenizer,
    value_head: ValueHead,
    *,
    trained_for: str = "",
    base_model: str | None = None,
    reference: str | None = None,
    extra: dict[str, Any] | None = None,
) -> DoctorManifest:
    """Writes a doctor checkpoint.

    ``model`` is a transformers causal LM (full doctor) or a peft ``PeftModel`` (LoRA doctor,
    saved as its adapter; ``base_model`` names the weights it applies to and defaults to the
    base model's ``name_or_path``). ``reference`` names a full doctor's starting weights, used
    as ``pi_ref`` by the delta rule.
    """
    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    is_lora = hasattr(model, "peft_config")
    if is_lora:
        base = model.get_base_model()
        base_model = base_model or base.config.name_or_path
        if not base_model:
            raise ValueError("save_doctor: a LoRA doctor needs base_model (the path of its base weights)")
        config = base.config
    else:
        config = model.config
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = _reloaded_tokenizer(folder, tokenizer)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in value_head.state_dict().items()}
    save_file(state, str(folder / VALUE_HEAD_NAME))
    out_emb = (model.get_base_model() if is_lora else model).get_output_embeddings()
    manifest = DoctorManifest(
        kind="lora" if is_lora else "full",
        hidden_size=value_head.hidden_size,
        value_head_inner_size=value_head.inner_size,
        tokenizer_fingerprint=tokenizer_fingerprint(saved),
        tokenizer_size=len(saved),
        vocab_width=int(out_emb.weight.shape[0]) if out_emb is not None else int(config.vocab_size),
        base_model=base_model,
        reference=reference,
        trained_for=trained_for,
        extra=extra or {},
    )
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest.to_json(), indent=2) + "\n")
    return manifest


@dataclass
class LoadedDoctor:
    """A doctor ready to run: its LM (peft-wrapped for LoRA), value head, reference and manifest."""

    path: str
    manifest: DoctorManifest
    model: torch.nn.Module
    value_head: ValueHead
    reference_model: torch.nn.Module | None  # a full doctor's starting weights, when named

    @property
    def is_lora(self) -> bool:
        return self.manifest.kind == "lora"


def check_tokenizer(path: str, manifest: DoctorManifest, patient_tokenizer) -> None:
    """Raises unless the doctor's token ids mean the same strings as the patient's."""
    fp = tokenizer_fingerprint(patient_tokenizer)
    if fp != manifest.tokenizer_fingerprint or len(patient_tokenizer) != manifest.tokenizer_size:
        raise DoctorCheckpointError(
            path,
            f"its tokenizer ({manifest.tokenizer_size} tokens, fingerprint {manifest.tokenizer_fingerprint[:12]}) "
            f"is not the patient's ({len(patient_tokenizer)} tokens, fingerprint {fp[:12]}): "
            "doctor and patient must share token ids",
        )


def _load_lm(path: str, where: str, device, dtype):
    from transformers import AutoModelForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise DoctorCheckpointError(where, f"missing model weights: no config.json in {path!r}")
    try:
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
    except Exception as e:  # noqa: BLE001 - corrupt or partial weights: say which and why
        raise DoctorCheckpointError(where, f"cannot load model weights from {path!r}: {e}") from e


def load_doctor(
    path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    patient_tokenizer=None,
    load_reference: bool = True,
) -> LoadedDoctor:
    """Loads and checks a doctor checkpoint written by :func:`save_doctor`.

    Every problem (missing file, wrong version, corrupt weights, a tokenizer that is not the
    patient's) raises :class:`DoctorCheckpointError` naming the path and the problem.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.fspath(path)
    manifest = DoctorManifest.read(path)
    if patient_tokenizer is not None:
        check_tokenizer(path, manifest, patient_tokenizer)
    head_file = Path(path) / VALUE_HEAD_NAME
    if not head_file.is_file():
        raise DoctorCheckpointError(path, f"missing {VALUE_HEAD_NAME}")
    try:
        head_state = load_file(str(head_file))
    except (SafetensorError, OSError, Exception) as e:  # noqa: BLE001
        raise DoctorCheckpointError(path, f"corrupt {VALUE_HEAD_NAME}: {e}") from e
    head = ValueHead(manifest.hidden_size, manifest.value_head_inner_size)
    try:
        head.load_state_dict(head_state)
    except RuntimeError as e:
        raise DoctorCheckpointError(path, f"{VALUE_HEAD_NAME} does not match the manifest's head shape: {e}") from e
    head = head.to(device=device, dtype=dtype).eval()

    reference_model = None
    if manifest.kind == "lora":
        from peft import PeftModel

        base_path = manifest.resolve(path, manifest.base_model)
        if not (Path(path) / "adapter_config.json").is_file():
            raise DoctorCheckpointError(path, "missing adapter_config.json for a LoRA doctor")
        base = _load_lm(base_path, path, device, dtype)
        try:
            model = PeftModel.from_pretrained(base, path, is_trainable=False).to(device).eval()
        except Exception as e:  # noqa: BLE001
            raise DoctorCheckpointError(path, f"cannot load the LoRA adapter: {e}") from e
    else:
        model = _load_lm(path, path, device, dtype)
        if load_reference and manifest.reference:
            reference_model = _load_lm(manifest.resolve(path, manifest.reference), path, device, dtype)
    width = model.get_output_embeddings().weight.shape[0] if manifest.kind == "full" else (
        model.get_base_model().get_output_embeddings().weight.shape[0])
    if width < manifest.tokenizer_size:
        raise DoctorCheckpointError(path, f"logits width {width} is smaller than its tokenizer ({manifest.tokenizer_size})")
    return LoadedDoctor(path=path, manifest=manifest, model=model, value_head=head, reference_model=reference_model)
