"""Run by .ci/fresh_install inside the fresh venv: builds a tiny patient and a TRL-style preference
file, then runs `llmdoctor rewards` and `llmdoctor train` as a user would (console script,
subprocesses) and checks what they wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

work, llmdoctor = Path(sys.argv[1]), sys.argv[2]
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run(*argv):
    print("$ llmdoctor " + " ".join(argv), flush=True)
    p = subprocess.run([llmdoctor, *argv], capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"llmdoctor {argv[0]} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    print(p.stdout.strip().splitlines()[-1])
    return p


from llmdoctor_train.toy.models import build_tiny_lm, build_tokenizer, save_lm  # noqa: E402

assert "site-packages" in __import__("llmdoctor_train").__file__, "not the installed package"
tok = build_tokenizer()
patient = save_lm(build_tiny_lm(tok, vocab_pad_to=64), tok, work / "patient")
rows = [{"chosen": [{"role": "user", "content": f"The cat {w}"}, {"role": "assistant", "content": " helps the book."}],
         "rejected": [{"role": "user", "content": f"The cat {w}"}, {"role": "assistant", "content": " badly reads."}]}
        for w in ("kindly", "quickly", "carefully", "clearly", "politely", "warmly")]
(work / "prefs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
run("rewards", "--data", str(work / "prefs.jsonl"), "--patient", patient, "--output", str(work / "rewards"),
    "--no-progress", "--enforce-eager", "--dtype", "float32", "--max-model-len", "256",
    "--engine-arg", "kv_cache_memory_bytes=16777216", "--engine-arg", "max_num_seqs=8")
summary = json.loads((work / "rewards" / "summary.json").read_text())
assert summary["rows"] == len(rows) and summary["tokenizer_fingerprint"], summary
(work / "tfpo.yaml").write_text(f"rewards: {work / 'rewards'}\nmodel_name_or_path: {patient}\n"
                                f"output: {work / 'doctor'}\nlora_r: 4\nmax_steps: 2\nper_device_train_batch_size: 2\n")
run("train", "--config", str(work / "tfpo.yaml"), "--use_cpu", "--save_strategy", "no")
from llmdoctor_vllm.checkpoint import load_doctor  # noqa: E402

doc = load_doctor(work / "doctor", patient_tokenizer=tok)
assert doc.is_lora and (work / "doctor" / "README.md").is_file()
from llmdoctor_train.real.doctor import PACKAGED  # noqa: E402

assert "site-packages" in str(PACKAGED) and (PACKAGED / "adapter_model.safetensors").is_file(), \
    f"the real model's doctor is not installed as package data: {PACKAGED}"
print("fresh install: llmdoctor rewards and llmdoctor train ran from the base install + [cpu] (no dev extra)")
