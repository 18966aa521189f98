"""``llmdoctor train``: Stage 2, TFPO (or GenARM) training of a doctor from Stage 1's rewards."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

DESCRIPTION = """\
Trains a doctor LM and its value head on a token-reward dataset written by `llmdoctor rewards`
(a HF `datasets` folder from save_to_disk with prompt_ids, chosen_ids, rejected_ids,
chosen_rewards, rejected_rewards). The doctor must share the patient's tokenizer.
OUT becomes a doctor checkpoint for the vLLM plugin; Trainer checkpoints (each also a
loadable doctor) go to OUTPUT/checkpoints unless --checkpoint-dir says otherwise."""

HELP = "train a doctor with TFPO (Stage 2) from a token-reward dataset"

EPILOG = """\
example:
  llmdoctor train --rewards data/helpful_rewards --model Qwen/Qwen2.5-0.5B-Instruct \\
      --output doctors/helpful --lora-r 8 --max-steps 2000
  llmdoctor train ... --lora-r 0 --learning-rate 5e-5      # full fine-tuning
  llmdoctor train ... --loss-type genarm                    # the GenARM baseline doctor
  llmdoctor train ... --resume                              # continue from the last checkpoint"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``llmdoctor train``."""
    io = p.add_argument_group("data and models")
    io.add_argument("--rewards", required=True, metavar="DATASET_DIR",
                    help="Stage 1 output: a datasets folder (a Dataset, or a DatasetDict with a 'train' split)")
    io.add_argument("--model", required=True, metavar="DOCTOR_BASE",
                    help="the doctor's starting causal LM (a local folder); it must use the patient's tokenizer")
    io.add_argument("--output", required=True, metavar="OUT", help="where to write the trained doctor checkpoint")
    io.add_argument("--checkpoint-dir", help="Trainer checkpoints (default: OUT/checkpoints)")
    io.add_argument("--dimension", default=None,
                    help="train on the rewards of this preference dimension (columns chosen_rewards_<d>, "
                         "rejected_rewards_<d>) instead of the dataset's main one")
    io.add_argument("--trained-for", default=None,
                    help="what the doctor is for, written to the manifest (default: --dimension, else 'tfpo'/'genarm')")
    io.add_argument("--reference", help="full fine-tuning: the delta rule's reference weights (default: --model)")
    io.add_argument("--eval-split", default=None,
                    help="a split of a DatasetDict to evaluate on (default: 'validation' or 'test' if present)")

    loss = p.add_argument_group("loss")
    loss.add_argument("--loss-type", choices=["tfpo", "genarm"], default="tfpo",
                      help="tfpo: subtrajectory balance + value discrimination; genarm: GenARM's trajectory loss")
    loss.add_argument("--subtb-weighting", choices=["all", "lambda", "trajectory"], default="all",
                      help="which subtrajectories L_SubTB uses: all pairs, lambda^(n-m)-weighted, or the whole "
                           "trajectory only (fits fastest on toys; see METHOD.md) (default: all)")
    loss.add_argument("--subtb-lambda", type=float, default=0.9, help="lambda for --subtb-weighting lambda (0.9)")
    loss.add_argument("--flow-target", choices=["reference", "absolute"], default="reference",
                      help="log Q: sum r + log pi_ref (default: a tilt of the start) or sum r (the paper's)")
    loss.add_argument("--reward-scale", type=float, default=1.0, help="TFPO fits scale x the token rewards (1)")
    loss.add_argument("--lam", type=float, default=0.1, help="weight of the value-discrimination loss (0.1)")
    loss.add_argument("--gamma", type=float, default=0.1, help="margin of the value-discrimination hinge (0.1)")
    loss.add_argument("--genarm-beta", type=float, default=0.05, help="beta_r of the GenARM loss (0.05)")
    loss.add_argument("--value-head-inner-size", type=int, default=None, help="value head width (default: hidden size)")

    lora = p.add_argument_group("LoRA")
    lora.add_argument("--lora-r", type=int, default=8, help="LoRA rank; 0 trains all weights (default: 8)")
    lora.add_argument("--lora-alpha", type=int, default=16, help="LoRA alpha (16)")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout (0.05)")
    lora.add_argument("--lora-target-modules", default="all-linear",
                      help="comma-separated module names, or 'all-linear' (default)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--learning-rate", type=float, default=None, help="default 5e-4 with LoRA, 5e-5 full")
    opt.add_argument("--batch-size", type=int, default=4, help="preference pairs per device and step (4)")
    opt.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps (1)")
    opt.add_argument("--epochs", type=float, default=1.0, help="training epochs (1)")
    opt.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (overrides --epochs)")
    opt.add_argument("--warmup-steps", type=int, default=100, help="linear warmup steps (100)")
    opt.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (0)")
    opt.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (1.0)")
    opt.add_argument("--max-length", type=int, default=1024, help="longest prompt+response in tokens (1024)")
    opt.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="mixed precision (fp32)")
    opt.add_argument("--model-dtype", choices=["float32", "bfloat16", "float16", "auto"], default="float32",
                     help="dtype the doctor's weights are loaded and trained in (float32)")
    opt.add_argument("--seed", type=int, default=42, help="random seed (42)")

    run = p.add_argument_group("run")
    run.add_argument("--logging-steps", type=int, default=10, help="log metrics every N steps (10)")
    run.add_argument("--save-steps", type=int, default=500, help="write a Trainer checkpoint every N steps (500)")
    run.add_argument("--save-total-limit", type=int, default=2, help="keep this many checkpoints (2)")
    run.add_argument("--resume", nargs="?", const=True, default=None, metavar="CHECKPOINT",
                     help="resume from CHECKPOINT, or from the last one in --checkpoint-dir if none is named")
    run.add_argument("--report-to", default="none", help="Trainer integrations, e.g. 'tensorboard' (none)")


def _load_rewards(path: str, eval_split: str | None):
    """The train (and optional eval) split of a saved rewards dataset, with a clear error."""
    from datasets import DatasetDict, load_from_disk

    if not Path(path).is_dir():
        raise SystemExit(f"llmdoctor train: --rewards {path!r} is not a directory written by save_to_disk")
    try:
        data = load_from_disk(path)
    except Exception as e:  # noqa: BLE001 - not a datasets folder
        raise SystemExit(f"llmdoctor train: cannot load the rewards dataset {path!r}: {e}") from None
    if not isinstance(data, DatasetDict):
        return data, None
    if "train" not in data:
        raise SystemExit(f"llmdoctor train: {path!r} has splits {list(data)} but no 'train'")
    names = [eval_split] if eval_split else ["validation", "test"]
    ev = next((data[n] for n in names if n in data), None)
    if eval_split and ev is None:
        raise SystemExit(f"llmdoctor train: {path!r} has no split {eval_split!r}")
    return data["train"], ev


def _select_rewards(ds, dimension: str | None):
    """Keeps the five fields TFPO reads; with ``dimension``, its reward columns become the rewards."""
    from llmdoctor_train.stage2.trainer import FIELDS

    if ds is None:
        return None
    source = {f: f for f in FIELDS}
    if dimension:
        source.update(chosen_rewards=f"chosen_rewards_{dimension}", rejected_rewards=f"rejected_rewards_{dimension}")
    missing = [c for c in source.values() if c not in ds.column_names]
    if missing:
        raise SystemExit(f"llmdoctor train: the rewards dataset lacks column(s) {missing} "
                         f"(it has {ds.column_names}); was it written by `llmdoctor rewards`?")
    ds = ds.select_columns(list(source.values()))
    renames = {src: dst for dst, src in source.items() if src != dst}
    return ds.rename_columns(renames) if renames else ds


def run_train(args: argparse.Namespace) -> str:
    """Runs ``llmdoctor train`` from parsed arguments; returns the output checkpoint path."""
    import torch

    from llmdoctor_train.stage2.trainer import TFPOConfig, TFPOTrainer

    train_ds, eval_ds = _load_rewards(args.rewards, args.eval_split)
    train_ds, eval_ds = _select_rewards(train_ds, args.dimension), _select_rewards(eval_ds, args.dimension)
    lora = args.lora_r > 0
    ckpt_dir = args.checkpoint_dir or os.path.join(args.output, "checkpoints")
    has_eval = eval_ds is not None
    config = TFPOConfig(
        output_dir=ckpt_dir, loss_type=args.loss_type, subtb_weighting=args.subtb_weighting,
        subtb_lambda=args.subtb_lambda, lam=args.lam, gamma=args.gamma, genarm_beta=args.genarm_beta,
        flow_target=args.flow_target, reward_scale=args.reward_scale,
        value_head_inner_size=args.value_head_inner_size, max_length=args.max_length,
        trained_for=args.trained_for or args.dimension or "", model_dtype=args.model_dtype,
        learning_rate=args.learning_rate or (5e-4 if lora else 5e-5), per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs, max_steps=args.max_steps, warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
        bf16=args.precision == "bf16", fp16=args.precision == "fp16",
        logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps,
        save_total_limit=args.save_total_limit, report_to=args.report_to,
        eval_strategy="steps" if has_eval else "no", eval_steps=args.save_steps if has_eval else None,
        dataloader_pin_memory=torch.cuda.is_available(),
    )
    peft_config = None
    if lora:
        from peft import LoraConfig

        targets = args.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                                 target_modules=targets, task_type="CAUSAL_LM")
    trainer = TFPOTrainer(args.model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                          peft_config=peft_config, reference_model=args.reference)
    trainer.train(resume_from_checkpoint=args.resume)
    trainer.save_model(args.output)
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h or "train_loss" in h), {})
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
    print(f"llmdoctor train: wrote doctor to {args.output} after {trainer.state.global_step} steps ({summary})")
    return args.output

