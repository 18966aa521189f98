"""``llmdoctor train``: Stage 2, TFPO (or GenARM) training of a doctor from Stage 1's rewards,
parsed by TRL's ``TrlParser`` as ``trl dpo`` is: :class:`TrainScriptArguments`, every
:class:`TFPOConfig` (``TrainingArguments``) field and :class:`DoctorModelConfig` (TRL's
``ModelConfig``: the model and its LoRA) are flags, and ``--config FILE.yaml`` sets any of them."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

DESCRIPTION = """\
Trains a doctor LM and its value head on a token-reward dataset written by `llmdoctor rewards`
(a HF `datasets` folder from save_to_disk with prompt_ids, chosen_ids, rejected_ids,
chosen_rewards, rejected_rewards). The doctor must share the patient's tokenizer and be a
decoder the plugin can run: both are checked before the first step.
OUTPUT becomes a doctor checkpoint for the vLLM plugin, with a model card (README.md); Trainer
checkpoints (each also a loadable doctor) go to OUTPUT/checkpoints unless --output_dir says
otherwise. The doctor is a LoRA adapter unless --use_peft false. Every transformers
TrainingArguments flag works (--bf16, --gradient_checkpointing, --lr_scheduler_type,
--report_to ...), and so do TRL's ModelConfig flags (--lora_r, --lora_alpha, --lora_dropout,
--lora_target_modules, --dtype ...), in --snake_case or --kebab-case; --config FILE.yaml takes
any of them as keys, as a TRL training script does; flags given after it win."""

HELP = "train a doctor with TFPO (Stage 2) from a token-reward dataset"

EPILOG = """\
examples:
  llmdoctor train --rewards data/helpful_rewards --model Qwen/Qwen2.5-0.5B-Instruct \\
      --output doctors/helpful --lora_r 8 --max_steps 2000
  llmdoctor train ... --use_peft false --learning_rate 5e-5   # full fine-tuning
  llmdoctor train ... --loss_type genarm                      # the GenARM baseline doctor
  llmdoctor train ... --resume_from_checkpoint                # continue from the last checkpoint
  llmdoctor train --config tfpo.yaml --max_steps 10           # a TRL-style YAML, one flag overridden
with tfpo.yaml:
  rewards: data/helpful_rewards
  model_name_or_path: Qwen/Qwen2.5-0.5B-Instruct
  output: doctors/helpful
  lora_r: 16
  learning_rate: 2.0e-4
  gradient_accumulation_steps: 4
  bf16: true"""


def _arg(default=dataclasses.MISSING, help_text: str = "", **metadata):
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass
class TrainScriptArguments:
    """What ``llmdoctor train`` reads and writes besides the model and the training config."""

    rewards: str = _arg(help_text="Stage 1 output: a datasets folder (a Dataset, or a DatasetDict with a 'train' "
                                  "split).", metavar="DATASET_DIR")
    output: str = _arg(help_text="Where to write the trained doctor checkpoint.", metavar="OUTPUT")
    eval_split: str | None = _arg(None, "A split of a DatasetDict to evaluate on (default: 'validation' or 'test' "
                                        "if present; evaluation then runs every save_steps).")
    reference: str | None = _arg(None, "Full fine-tuning: the delta rule's reference weights (default: the "
                                       "starting model).")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser():
    """TRL's parser over the script arguments, :class:`TFPOConfig` and :class:`DoctorModelConfig` (as ``trl dpo``
    builds its own)."""
    from trl import TrlParser

    from llmdoctor_train.stage2.config import DoctorModelConfig, TFPOConfig

    return TrlParser((TrainScriptArguments, TFPOConfig, DoctorModelConfig), prog="llmdoctor train",
                     description=DESCRIPTION, epilog=EPILOG, formatter_class=_HelpFormatter)


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


def parse_args(argv) -> tuple[TrainScriptArguments, "TFPOConfig", "DoctorModelConfig"]:
    """``argv`` (after ``train``) parsed into the script arguments, the training config and the model
    config, with the CLI's defaults: checkpoints under OUTPUT/checkpoints, ``trained_for`` the
    dimension's name, ``model_init_kwargs`` from the model config."""
    try:
        script, config, model_args = make_parser().parse_args_and_config(list(argv))
    except ValueError as e:  # a value a config refuses, a bad YAML file
        raise SystemExit(f"llmdoctor train: {e}") from None
    changes = {"model_init_kwargs": model_args.model_init_kwargs() | (config.model_init_kwargs or {})}
    if config.output_dir in (None, "trainer_output"):  # transformers' default name: not asked for
        changes["output_dir"] = os.path.join(script.output, "checkpoints")
    if not config.trained_for and config.dimension:
        changes["trained_for"] = config.dimension
    return script, dataclasses.replace(config, **changes), model_args


def _with_eval(config, has_eval: bool):
    """Evaluates every ``save_steps`` when the data has an eval split and no strategy was chosen."""
    if not has_eval or str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no":
        return config
    return dataclasses.replace(config, eval_strategy="steps", eval_steps=config.save_steps)


def _check_doctor(model_path: str, rewards: str):
    """The doctor's tokenizer, after refusing a doctor the plugin cannot run or whose tokenizer is not the
    patient's (before any weights are loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    from llmdoctor_train.stage2.checks import DoctorMismatchError, check_architecture, check_rewards_tokenizer

    try:
        check_architecture(AutoConfig.from_pretrained(model_path))
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        check_rewards_tokenizer(tokenizer, rewards)
    except (DoctorMismatchError, OSError) as e:
        raise SystemExit(f"llmdoctor train: --model {model_path}: {e}") from None
    return tokenizer


def run_train(argv) -> str:
    """Runs ``llmdoctor train ARGV...``; returns the output checkpoint path."""
    from trl import get_peft_config

    from llmdoctor_train.stage2.trainer import ResumeCheckpointError, TFPOTrainer

    script, config, model_args = parse_args(argv)
    train_ds, eval_ds = _load_rewards(script.rewards, script.eval_split)
    for split in (train_ds, eval_ds):  # the columns, before any weights are loaded
        try:
            TFPOTrainer._prepare_dataset(split, config, "train" if split is train_ds else "eval")
        except ValueError as e:
            raise SystemExit(f"llmdoctor train: {e}") from None
    tokenizer = _check_doctor(model_args.model_name_or_path, script.rewards)
    config = _with_eval(config, eval_ds is not None)
    trainer = TFPOTrainer(model_args.model_name_or_path, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=get_peft_config(model_args),
                          ref_model=script.reference)
    resume = config.resume_from_checkpoint
    try:
        trainer.train(resume_from_checkpoint=True if resume in ("last", "true", "True") else resume)
    except ResumeCheckpointError as e:
        raise SystemExit(str(e)) from None
    trainer.save_model(script.output)
    trainer.create_model_card(script.output, dataset_name=script.rewards)
    last = next((h for h in reversed(trainer.state.log_history) if "loss" in h or "train_loss" in h), {})
    summary = ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float))
    print(f"llmdoctor train: wrote doctor to {script.output} after {trainer.state.global_step} steps ({summary})")
    return script.output
