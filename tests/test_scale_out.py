"""Tensor parallelism: every rank builds the processor and its own doctor; they must steer alike."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.helpers import PROMPTS, run, sp

_TP_SCRIPT = """
import json, sys
from vllm import LLM, SamplingParams
patient, doctors, settings = json.loads(sys.argv[1])
llm = LLM(model=patient, dtype="float32", enforce_eager=True, max_model_len=256, max_num_seqs=4, seed=0,
          tensor_parallel_size=2, additional_config={"llmdoctor": {"doctors": doctors, "beta": 0.0}})
params = [SamplingParams(max_tokens=12, temperature=t, seed=3, extra_args=x) for x, t in settings]
outs = llm.generate(%r, params, use_tqdm=False)
print("TOKENS " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""

SETTINGS = [({"llmdoctor_beta_doctor0": 1.0}, 0.0),
            ({"llmdoctor_beta_lora": 0.7, "llmdoctor_beta_doctor1": 0.5, "llmdoctor_rule": "delta"}, 1.0),
            ({}, 0.0),
            ({"llmdoctor_beta": 0.6}, 1.0)]


def test_tensor_parallel_2_steers_like_tp_1(tiny, engine):
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_OMP_THREADS_BIND="0|1", VLLM_CPU_KVCACHE_SPACE="1")  # one core per rank
    payload = json.dumps([tiny["patient"], tiny["doctors"], SETTINGS])
    out = subprocess.run([sys.executable, "-c", _TP_SCRIPT % PROMPTS, payload], capture_output=True, text=True,
                         env=env, timeout=600)
    lines = [x for x in out.stdout.splitlines() if x.startswith("TOKENS ")]
    assert lines, out.stderr[-4000:]
    tp2 = json.loads(lines[0][len("TOKENS "):])
    params = [sp(guide={k[len("llmdoctor_"):]: v for k, v in x.items()}, max_tokens=12, temperature=t, seed=3)
              for x, t in SETTINGS]
    tp1 = run(engine, PROMPTS, params)[0]
    assert tp2 == tp1
    assert tp1[0] != run(engine, PROMPTS[:1], sp(max_tokens=12))[0][0]  # guidance did steer
