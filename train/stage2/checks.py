"""Checks made before any training step: a doctor the plugin could not run, or whose tokenizer is
not the patient's, is refused up front instead of after the run (when the engine loads it)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"


class DoctorMismatchError(ValueError):
    """The doctor cannot be trained for this patient or served by the plugin."""


def check_architecture(config) -> None:
    """Raises :class:`DoctorMismatchError` unless the plugin's runner can run a doctor of ``config``.

    The runner's own test (``llmdoctor_vllm.layers.unwrap_decoder``: a Llama-family decoder without
    sliding-window attention) is applied to an empty model built on the meta device, so no
    weights are read or allocated.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from llmdoctor_vllm.layers import unwrap_decoder

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - not a causal LM transformers can build
        raise DoctorMismatchError(f"the doctor's config is not a causal LM transformers can build: {e}") from None
    try:
        unwrap_decoder(model)
    except ValueError as e:
        raise DoctorMismatchError(f"{e}; the plugin could not serve this doctor") from None


def patient_tokenizer_record(rewards_dir: str | Path) -> dict | None:
    """The patient tokenizer's fingerprint and size as Stage 1 recorded them in ``summary.json``
    (None for a dataset not written by ``llmdoctor rewards``)."""
    path = Path(rewards_dir) / SUMMARY_NAME
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if "tokenizer_fingerprint" not in summary:
        return None
    return {"fingerprint": summary["tokenizer_fingerprint"], "size": summary.get("tokenizer_size")}


def check_rewards_tokenizer(tokenizer, rewards_dir: str | Path) -> None:
    """Raises :class:`DoctorMismatchError` when the doctor's tokenizer is not the one Stage 1 scored
    with (the patient's); only warns when the rewards carry no record of it."""
    from llmdoctor_vllm.checkpoint import tokenizer_fingerprint

    record = patient_tokenizer_record(rewards_dir)
    if record is None:
        logger.warning("%s has no %s with the patient tokenizer's fingerprint: the doctor's tokenizer is not "
                       "checked against the patient's", rewards_dir, SUMMARY_NAME)
        return
    fp = tokenizer_fingerprint(tokenizer)
    if fp != record["fingerprint"] or (record["size"] is not None and len(tokenizer) != record["size"]):
        raise DoctorMismatchError(
            f"the doctor's tokenizer ({len(tokenizer)} tokens, fingerprint {fp[:12]}) is not the patient's that "
            f"scored {rewards_dir} ({record['size']} tokens, fingerprint {record['fingerprint'][:12]}): doctor and "
            "patient must share token ids, and the plugin would refuse this doctor")
