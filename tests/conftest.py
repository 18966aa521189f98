"""Shared fixtures: tiny local models (built once per session) and one in-process vLLM engine."""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process engines start in seconds
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# TRL sets VLLM_LOGGING_LEVEL=ERROR on import unless it is set; the plugin's INFO lines are tested
os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")

import pytest  # noqa: E402

from tests.helpers import ENGINE_KW  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny patient, two full doctors (with references) and a LoRA doctor, as HF folders."""
    from llmdoctor_train.toy.models import build_tiny_doctor, build_tiny_lm, build_tiny_pair, save_lm

    root = tmp_path_factory.mktemp("tiny")
    pair = build_tiny_pair(root, n_doctors=2)
    tok = pair["tokenizer"]
    base = save_lm(build_tiny_lm(tok, hidden_size=64, num_layers=2, num_heads=1, seed=40), tok, root / "lora_base")
    pair["doctors"]["lora"] = build_tiny_doctor(tok, root / "lora", seed=41, lora_base=base)
    pair["root"] = root
    return pair


@pytest.fixture(scope="session")
def engine(tiny):
    """One in-process engine with three doctors; requests are unguided unless they ask."""
    from vllm import LLM

    cfg = {"llmdoctor": {"doctors": tiny["doctors"], "alpha": 1.0, "beta": 0.0}}
    return LLM(model=tiny["patient"], additional_config=cfg, **ENGINE_KW)


@pytest.fixture(scope="session")
def hf_models(tiny):
    """The same patient and doctors loaded with transformers / peft, for reference scoring."""
    from transformers import AutoModelForCausalLM

    from llmdoctor_vllm.checkpoint import load_doctor

    patient = AutoModelForCausalLM.from_pretrained(tiny["patient"]).eval()
    doctors = {n: load_doctor(p, patient_tokenizer=tiny["tokenizer"]) for n, p in tiny["doctors"].items()}
    return patient, doctors


@pytest.fixture(scope="session")
def keep_alive():
    """Extra in-process engines live until the session ends: tearing one down mid-session would
    tear down vLLM's process-wide parallel state under the shared ``engine``."""
    engines = []
    yield engines.append
