"""Rebuilds the real model's positive-sentiment doctor end to end with the project's own commands, and
times each stage. The shell form (WORK a scratch folder):

    llmdoctor smollm2                                   # the patient, converted once
    llmdoctor pairs --output WORK/pairs.jsonl --prompts 200 --samples 4
    llmdoctor rewards --data WORK/pairs.jsonl --patient PATIENT --output WORK/rewards \\
        --positive "<POSITIVE>" --negative "<NEGATIVE>" --append-eos --dtype float32 --enforce-eager \\
        --max-model-len 512 --engine-arg kv_cache_memory_bytes=1073741824
    llmdoctor train --rewards WORK/rewards --model PATIENT --output WORK/doctor_lora --lora_r 8 \\
        --max_steps 100 --per_device_train_batch_size 4 --max_length 160 --subtb_weighting trajectory ...

``python -m llmdoctor_train.real.build_doctor --workdir WORK`` runs them (``--install`` then copies
the LoRA doctor into the package, where ``llmdoctor demo`` finds it); ``--cut-layers K`` trains a
doctor cut from the patient's first K layers instead (full fine-tuning, its own starting weights as
the delta rule's reference).
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

POSITIVE = ("You are a warm, cheerful assistant. Reply in a warm, positive, upbeat tone, and describe "
            "everything in a happy, hopeful light.")
NEGATIVE = ("You are a gloomy, grumpy assistant. Reply in a cold, negative, pessimistic tone, and describe "
            "everything in a sad, bleak light.")
PAIR_PROMPTS, SAMPLES = 200, 4
TRAIN = dict(steps=100, batch_size=4, max_length=160, learning_rate=1e-3)


def pairs_command(work: Path) -> list[str]:
    """``llmdoctor pairs``: replies sampled from the patient, ranked by VADER."""
    return ["pairs", "--output", str(work / "pairs.jsonl"), "--prompts", str(PAIR_PROMPTS), "--samples", str(SAMPLES)]


def rewards_command(work: Path, patient: str) -> list[str]:
    """``llmdoctor rewards``: Stage 1 under the positive and the negative tone instruction."""
    from llmdoctor_train.real.engine import ENGINE

    return ["rewards", "--data", str(work / "pairs.jsonl"), "--patient", patient, "--output", str(work / "rewards"),
            "--positive", POSITIVE, "--negative", NEGATIVE, "--append-eos", "--dtype", ENGINE["dtype"],
            "--enforce-eager", "--max-model-len", str(ENGINE["max_model_len"]),
            "--engine-arg", f"kv_cache_memory_bytes={ENGINE['kv_cache_memory_bytes']}", "--no-progress"]


def train_command(work: Path, model: str, output: str, *, lora: bool = True, steps: int = TRAIN["steps"],
                  extra=()) -> list[str]:
    """``llmdoctor train``: TFPO on the rewards; a LoRA (r = 8) doctor on ``model``, or (``lora=False``)
    ``model`` trained in full with itself as the reference."""
    lr = TRAIN["learning_rate"] if lora else 1e-4
    peft = ["--lora_r", "8"] if lora else ["--use_peft", "false"]
    return ["train", "--rewards", str(work / "rewards"), "--model", model, "--output", output, *peft,
            "--max_steps", str(steps), "--per_device_train_batch_size", str(TRAIN["batch_size"]),
            "--max_length", str(TRAIN["max_length"]), "--learning_rate", str(lr), "--warmup_steps", "5",
            "--subtb_weighting", "trajectory", "--logging_steps", "5", "--save_steps", "20", "--report_to", "none",
            "--trained_for", "positive sentiment", "--seed", "42", *extra]


def run(argv: list[str], log: Path) -> float:
    """Runs ``llmdoctor ARGV`` in a fresh process (output to ``log``); returns its wall time in seconds."""
    print("$ llmdoctor " + shlex.join(argv), flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-m", "llmdoctor_train.cli", *argv], stdout=f, stderr=subprocess.STDOUT,
                       check=True)
    seconds = time.perf_counter() - t0
    print(f"  {seconds:.0f} s (log: {log})", flush=True)
    return seconds


def main(argv=None) -> None:
    """``python -m llmdoctor_train.real.build_doctor``: the stages above, timed into WORK/timings.json."""
    p = argparse.ArgumentParser(prog="python -m llmdoctor_train.real.build_doctor", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="folder for the pairs, rewards, doctors and logs")
    p.add_argument("--cut-layers", type=int, help="train a doctor cut to the patient's first K layers instead")
    p.add_argument("--steps", type=int, default=TRAIN["steps"], help=f"TFPO steps (default: {TRAIN['steps']})")
    p.add_argument("--skip-existing", action="store_true", help="reuse the pairs and rewards already in WORK")
    p.add_argument("--install", action="store_true", help="copy the LoRA doctor into the package afterwards")
    args = p.parse_args(argv)
    from llmdoctor_train.real.smollm2 import materialize_smollm2

    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    times_file = work / "timings.json"
    times = json.loads(times_file.read_text()) if times_file.is_file() else {}
    t0 = time.perf_counter()
    patient = str(materialize_smollm2())
    times["smollm2"] = round(time.perf_counter() - t0, 1)
    if not (args.skip_existing and (work / "pairs.jsonl").is_file()):
        times["pairs"] = round(run(pairs_command(work), work / "pairs.log"), 1)
    if not (args.skip_existing and (work / "rewards" / "summary.json").is_file()):
        times["rewards"] = round(run(rewards_command(work, patient), work / "rewards.log"), 1)
    if args.cut_layers:
        from llmdoctor_train.real.cut import cut_layers

        start = work / f"cut{args.cut_layers}"
        t0 = time.perf_counter()
        cut_layers(patient, args.cut_layers, start)
        name = f"doctor_cut{args.cut_layers}"
        times[f"cut{args.cut_layers}"] = round(time.perf_counter() - t0, 1)
        times[f"train_{name}"] = round(run(train_command(work, str(start), str(work / name), lora=False,
                                                         steps=args.steps), work / f"train_{name}.log"), 1)
    else:
        times["train_doctor_lora"] = round(run(train_command(work, patient, str(work / "doctor_lora"),
                                                             steps=args.steps), work / "train_doctor_lora.log"), 1)
        if args.install:
            from llmdoctor_train.real.doctor import install_doctor

            print(f"installed into {install_doctor(work / 'doctor_lora')}")
    times_file.write_text(json.dumps(times, indent=1))
    print(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
