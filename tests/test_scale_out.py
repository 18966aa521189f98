"""Scale-out: tensor-parallel serving (every rank builds the processor and its own doctor; they must steer
alike) and data-parallel training (`llmdoctor train` under `accelerate launch`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import PROMPTS, run, sp

_TP_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams, TokensPrompt
patient, doctors, settings, marked = json.loads(sys.argv[1])
llm = LLM(model=patient, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
          tensor_parallel_size=2, additional_config={"llmdoctor": {"doctors": doctors, "beta": 0.0}})
params = [SamplingParams(max_tokens=12, temperature=t, seed=3, extra_args=x) for x, t in settings]
outs = llm.generate(%r, params, use_tqdm=False)
print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
guided = SamplingParams(max_tokens=12, temperature=0.0, extra_args={"llmdoctor_beta_doctor0": 1.0})
outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in marked], guided, use_tqdm=False)
print("FAULTED " + json.dumps([list(o.outputs[0].token_ids) for o in outs]), flush=True)
"""

# Put on PYTHONPATH of the TP=2 run (vLLM spawns its workers, so a patch in the script would not reach
# them): on tensor-parallel rank 1 only, the doctor's forward runs out of memory whenever its batch
# holds the marker tokens, a fault the other rank does not see.
_RANK1_FAULT = """
import importlib.abc, importlib.machinery, sys

MARK = %r


class _PatchRunner(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "llmdoctor_vllm.runner":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        load = spec.loader.exec_module

        def exec_module(module):
            load(module)
            step = module.DoctorRunner.step

            def step_rank1_fault(self, ids, tokens, *a, **k):
                import numpy as np
                import torch
                from vllm.distributed import get_tensor_model_parallel_rank

                t = np.asarray(tokens[1]).tolist()
                if get_tensor_model_parallel_rank() == 1 and any(t[i:i + len(MARK)] == MARK for i in range(len(t))):
                    raise torch.OutOfMemoryError("CUDA out of memory (injected on rank 1 only)")
                return step(self, ids, tokens, *a, **k)

            module.DoctorRunner.step = step_rank1_fault

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _PatchRunner())
"""

SETTINGS = [({"llmdoctor_beta_doctor0": 1.0}, 0.0),
            ({"llmdoctor_beta_lora": 0.7, "llmdoctor_beta_doctor1": 0.5, "llmdoctor_rule": "delta"}, 1.0),
            ({}, 0.0),
            ({"llmdoctor_beta": 0.6}, 1.0)]
MARK = [11, 23, 5, 17]  # no generated text of 12 tokens holds these four in a row


@pytest.fixture(scope="module")
def tp2(tiny, tmp_path_factory):
    """One TP=2 engine (a process per rank, one core each, with the rank-1 fault above): its outputs for
    ``SETTINGS`` over ``PROMPTS``, for the marked prompts, and its log."""
    hooks = tmp_path_factory.mktemp("rank1_fault")
    (hooks / "sitecustomize.py").write_text(_RANK1_FAULT % MARK)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1",  # one core per rank
               PYTHONPATH=os.pathsep.join(filter(None, [str(hooks), env.get("PYTHONPATH")])))
    payload = json.dumps([tiny["patient"], tiny["doctors"], SETTINGS, marked_prompts(tiny)])
    out = subprocess.run([sys.executable, "-c", _TP_SCRIPT % PROMPTS, payload], capture_output=True, text=True,
                         env=env, timeout=600)
    found = {}
    for line in out.stdout.splitlines():
        for tag in ("TOKENS ", "FAULTED "):
            if line.startswith(tag):
                found[tag.strip()] = json.loads(line[len(tag):])
    assert len(found) == 2, out.stdout[-2000:] + out.stderr[-4000:]
    return found, out.stdout + out.stderr


def marked_prompts(tiny) -> list[list[int]]:
    """A prompt holding the marker that faults rank 1's doctor."""
    return [MARK + tiny["tokenizer"](PROMPTS[1])["input_ids"]]


def test_tensor_parallel_2_steers_like_tp_1(tp2, engine):
    params = [sp(guide={k[len("llmdoctor_"):]: v for k, v in x.items()}, max_tokens=12, temperature=t, seed=3)
              for x, t in SETTINGS]
    tp1 = run(engine, PROMPTS, params)[0]
    assert tp2[0]["TOKENS"] == tp1
    assert tp1[0] != run(engine, PROMPTS[:1], sp(max_tokens=12))[0][0]  # guidance did steer


def test_a_fault_on_one_rank_unguides_the_request_on_every_rank(tiny, tp2, engine):
    """An out-of-memory in rank 1's doctor forward, which rank 0 does not have: both ranks leave the
    step's requests unguided (each rank samples its own token, so a rank that kept guiding would feed
    the model shards other tokens than its peer), and the outputs are the patient's own."""
    from vllm import TokensPrompt

    found, log = tp2
    prompts = [TokensPrompt(prompt_token_ids=p) for p in marked_prompts(tiny)]
    plain = run(engine, prompts, sp(max_tokens=12))[0]
    guided = run(engine, prompts, sp(guide={"beta_doctor0": 1.0}, max_tokens=12))[0]
    assert guided != plain  # guidance steers these prompts, so a rank that kept guiding would show
    assert found["FAULTED"] == plain
    assert "another tensor-parallel rank could not guide it" in log  # rank 0 says why


# `llmdoctor train` as it runs under `accelerate launch`, with each process's own metrics recorded beside
# what the trainer logs (the means over both processes must be what is logged)
_DDP_SCRIPT = """
import json, os, sys
import torch
from llmdoctor_train.stage2.trainer import TFPOTrainer
logged = TFPOTrainer.log
def log(self, logs, start_time=None):
    mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
    local = {k: torch.stack(v).float().mean().item() for k, v in self._metrics[mode].items() if v}
    logged(self, logs, start_time)
    with open(os.path.join(os.environ["METRICS_DIR"], f"rank{self.accelerator.process_index}.jsonl"), "a") as f:
        f.write(json.dumps({"local": local, "logged": logs, "world": self.accelerator.num_processes}) + "\\n")
TFPOTrainer.log = log
from llmdoctor_train.cli import main
main(sys.argv[1:])
"""


def test_ddp_training_logs_means_over_processes_and_its_doctor_steers(tiny, tmp_path, keep_alive):
    """``accelerate launch --num_processes 2 --cpu`` runs ``llmdoctor train`` over gloo: every logged TFPO
    metric is the mean of the two processes' own values (which differ: they see different pairs), and the
    doctor it writes loads in the plugin and steers as the formula says."""
    import math

    import torch
    from datasets import Dataset
    from vllm import LLM, TokensPrompt

    from llmdoctor_vllm.checkpoint import load_doctor
    from tests.helpers import ENGINE_KW, guided_scores
    from tests.test_tfpo import synthetic_records

    Dataset.from_list(synthetic_records(16)).save_to_disk(str(tmp_path / "rw"))
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(METRICS_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    # accelerate's --cpu alone starts one process unless MPI is there; --multi_gpu starts both through
    # torchrun, and the trainer's --use_cpu makes them CPU processes over gloo
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
           "train", "--rewards", str(tmp_path / "rw"), "--model", str(tiny["root"] / "lora_base"),
           "--output", str(tmp_path / "doctor"), "--lora_r", "4", "--lora_dropout", "0", "--max_steps", "4",
           "--per_device_train_batch_size", "2", "--learning_rate", "5e-2", "--warmup_steps", "0",
           "--logging_steps", "2", "--save_steps", "4", "--report_to", "none", "--use_cpu"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    ranks = [[json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    steps = [(a, b) for a, b in zip(*ranks) if a["local"]]
    assert len(steps) >= 2 and all(a["world"] == 2 for a, _ in steps)
    differ = False
    for a, b in steps:
        assert a["logged"] == b["logged"]
        for k, v0 in a["local"].items():
            v1 = b["local"][k]
            assert math.isclose(a["logged"][k], (v0 + v1) / 2, rel_tol=1e-5, abs_tol=1e-6), (k, v0, v1, a["logged"])
            differ |= not math.isclose(v0, v1, rel_tol=1e-4)
    assert differ  # the processes saw different pairs, so a rank-0-only log would be caught

    doctor = str(tmp_path / "doctor")
    llm = LLM(model=tiny["patient"], additional_config={"llmdoctor": {"doctors": {"ddp": doctor}, "beta": 0.0}},
              **ENGINE_KW)
    keep_alive(llm)
    from transformers import AutoModelForCausalLM

    patient = AutoModelForCausalLM.from_pretrained(tiny["patient"]).eval()
    doctors = {"ddp": load_doctor(doctor, patient_tokenizer=tiny["tokenizer"])}
    prompt = tiny["tokenizer"](PROMPTS[0])["input_ids"]
    o = llm.generate([TokensPrompt(prompt_token_ids=prompt)], sp(guide={"beta": 1.0, "rule": "delta"}, logprobs=0),
                     use_tqdm=False)[0].outputs[0]
    ref = guided_scores(patient, doctors, prompt, list(o.token_ids), betas={"ddp": 1.0}, rule="delta")
    assert list(o.token_ids) == ref.argmax(-1).tolist()
    got = torch.tensor([lp[t].logprob for lp, t in zip(o.logprobs, o.token_ids)])
    want = torch.log_softmax(ref, -1)[torch.arange(len(o.token_ids)), torch.tensor(list(o.token_ids))]
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)
