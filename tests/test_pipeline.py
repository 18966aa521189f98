"""The whole loop on tiny models: Stage 1 rewards in vLLM -> TFPO doctor -> guided decoding in vLLM."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import ENGINE_KW, PROMPTS, guided_scores, run, sp

PAIRS = [("Tell me about the cat.", "The cat kindly helps the doctor.", "The cat rudely reads a book."),
         ("Describe the dog.", "A dog warmly thanks our team.", "A dog badly calls the river."),
         ("What does the teacher do?", "The teacher clearly answers a question.", "The teacher rarely writes."),
         ("Talk about my friend.", "My friend politely writes a letter.", "My friend poorly builds the house.")] * 2


@pytest.fixture(scope="module")
def trained_doctors(tiny, engine, tmp_path_factory):
    """Rewards scored by the shared engine, then a LoRA doctor and a full doctor trained by the CLI."""
    import datasets

    from llmdoctor_train.stage1.pipeline import compute_rewards
    from llmdoctor_train.cli import main as llmdoctor

    root = tmp_path_factory.mktemp("pipeline")
    data = datasets.Dataset.from_dict({"prompt": [p for p, _, _ in PAIRS], "chosen": [c for _, c, _ in PAIRS],
                                       "rejected": [r for _, _, r in PAIRS]})
    summary = compute_rewards(data, tiny["patient"], root / "rewards", llm=engine, progress=False)
    assert summary["rows"] == len(PAIRS)
    torch.set_num_threads(1)  # tiny models: threads cost more than they give on 2 shared cores
    out = {}
    for name, extra in (("lora", ["--lora_r", "4"]), ("full", ["--use_peft", "false", "--learning_rate", "1e-3"])):
        llmdoctor(["train", "--rewards", str(root / "rewards"), "--model", str(tiny["root"] / "lora_base"),
                   "--output", str(root / name), "--max_steps", "6", "--per_device_train_batch_size", "4",
                   "--warmup_steps", "0", "--logging_steps", "3", "--save_steps", "1000", "--report_to", "none",
                   *extra])
        out[name] = str(root / name)
    return out


def test_trained_doctor_loads_and_steers_vllm(tiny, trained_doctors, keep_alive):
    """Trainer checkpoints (LoRA and full) steer a real engine exactly as the formula says, both rules."""
    from vllm import LLM

    from llmdoctor_vllm.checkpoint import load_doctor

    llm = LLM(model=tiny["patient"], additional_config={"llmdoctor": {"doctors": trained_doctors, "beta": 0.0}},
              **ENGINE_KW)
    keep_alive(llm)
    from transformers import AutoModelForCausalLM

    patient = AutoModelForCausalLM.from_pretrained(tiny["patient"]).eval()
    doctors = {n: load_doctor(p, patient_tokenizer=tiny["tokenizer"]) for n, p in trained_doctors.items()}
    assert doctors["full"].reference_model is not None  # its starting weights, for the delta rule
    plain = run(llm, PROMPTS, sp(max_tokens=10))[0]
    assert run(llm, PROMPTS, sp(guide={"beta": 0.0}, max_tokens=10))[0] == plain
    from vllm import TokensPrompt

    ids = [tiny["tokenizer"](p)["input_ids"] for p in PROMPTS]
    for rule in ("product", "delta"):
        betas = {"lora": 2.0, "full": 1.5}
        guide = {"beta_lora": 2.0, "beta_full": 1.5, "rule": rule}
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in ids], sp(guide=guide, max_tokens=10),
                            use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outs] != plain
        for p_ids, o in zip(ids, outs):
            toks = list(o.outputs[0].token_ids)
            ref = guided_scores(patient, doctors, p_ids, toks, betas=betas, rule=rule)
            assert toks == ref.argmax(-1).tolist()
