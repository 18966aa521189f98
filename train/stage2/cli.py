"""``llmdoctor train``: Stage 2, TFPO (or GenARM) training of a doctor from Stage 1's rewards,
parsed by TRL's ``TrlParser``: :class:`TrainScriptArguments` and every :class:`TFPOConfig`
(``TrainingArguments``) field are flags, and ``--config FILE.yaml`` sets any of them."""

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
otherwise. Every transformers TrainingArguments flag works (--bf16, --gradient_checkpointing,
--lr_scheduler_type, --report_to ...), in --snake_case or --kebab-case, and --config FILE.yaml
takes any of them as keys, as a TRL training script does; flags given after it win."""

HELP = "train a doctor with TFPO (Stage 2) from a token-reward dataset"

EPILOG = """\
examples:
  llmdoctor train --rewards data/helpful_rewards --model Qwen/Qwen2.5-0.5B-Instruct \\
      --output doctors/helpful --lora-r 8 --max-steps 2000
  llmdoctor train ... --lora-r 0 --learning-rate 5e-5      # full fine-tuning
  llmdoctor train ... --loss-type genarm                    # the GenARM baseline doctor
  llmdoctor train ... --resume                              # continue from the last checkpoint
  llmdoctor train --config tfpo.yaml --max-steps 10         # a TRL-style YAML, one flag overridden
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
    """What ``llmdoctor train`` reads and writes besides :class:`TFPOConfig`: data, models, LoRA."""

    rewards: str = _arg(help_text="Stage 1 output: a datasets folder (a Dataset, or a DatasetDict with a 'train' "
                                  "split).", metavar="DATASET_DIR")
    model_name_or_path: str = _arg(help_text="The doctor's starting causal LM (a local folder); it must use the "
                                             "patient's tokenizer.", aliases=["--model"], metavar="DOCTOR_BASE")
    output: str = _arg(help_text="Where to write the trained doctor checkpoint.", metavar="OUTPUT")
    dimension: str | None = _arg(None, "Train on the rewards of this preference dimension (columns "
                                       "chosen_rewards_<d>, rejected_rewards_<d>) instead of the main one.")
    eval_split: str | None = _arg(None, "A split of a DatasetDict to evaluate on (default: 'validation' or 'test' "
                                        "if present; evaluation then runs every save_steps).")
    reference: str | None = _arg(None, "Full fine-tuning: the delta rule's reference weights (default: --model).")
    lora_r: int = _arg(8, "LoRA rank; 0 trains all weights.")
    lora_alpha: int = _arg(16, "LoRA alpha.")
    lora_dropout: float = _arg(0.05, "LoRA dropout.")
    lora_target_modules: str = _arg("all-linear", "Comma-separated module names, or 'all-linear'.")

    def peft_config(self):
        """peft's ``LoraConfig`` for these options (None for full fine-tuning)."""
        if self.lora_r <= 0:
            return None
        from peft import LoraConfig

        targets = self.lora_target_modules
        targets = targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
        return LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                          target_modules=targets, task_type="CAUSAL_LM")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser():
    """TRL's parser over :class:`TrainScriptArguments` and :class:`TFPOConfig` (as ``trl dpo`` builds its own)."""
    from trl import TrlParser

    from llmdoctor_train.stage2.config import TFPOConfig

    return TrlParser((TrainScriptArguments, TFPOConfig), prog="llmdoctor train", description=DESCRIPTION,
                     epilog=EPILOG, formatter_class=_HelpFormatter)


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
    from llmdoctor_train.stage2.config import FIELDS

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


def parse_args(argv) -> tuple[TrainScriptArguments, "TFPOConfig"]:
    """``argv`` (after ``train``) parsed into the script arguments and the training config, with the CLI's
    defaults: checkpoints under OUTPUT/checkpoints, ``trained_for`` the dimension's name."""
    try:
        script, config = make_parser().parse_args_and_config(list(argv))
    except ValueError as e:  # a config value TFPOConfig or TrainingArguments refuses, a bad YAML file
        raise SystemExit(f"llmdoctor train: {e}") from None
    changes = {}
    if config.output_dir in (None, "trainer_output"):  # transformers' default name: not asked for
        changes["output_dir"] = os.path.join(script.output, "checkpoints")
    if not config.trained_for and script.dimension:
        changes["trained_for"] = script.dimension
    return script, dataclasses.replace(config, **changes) if changes else config


def _with_eval(config, has_eval: bool):
    """Evaluates every ``save_steps`` when the data has an eval split and no strategy was chosen."""
    if not has_eval or str(getattr(config.eval_strategy, "value", config.eval_strategy)) != "no":
        return config
    return dataclasses.replace(config, eval_strategy="steps", eval_steps=config.save_steps)


def _check_doctor(script: TrainScriptArguments):
    """The doctor's tokenizer, after refusing a doctor the plugin cannot run or whose tokenizer is not the
    patient's (before any weights are loaded)."""
    from transformers import AutoConfig, AutoTokenizer

    from llmdoctor_train.stage2.checks import DoctorMismatchError, check_architecture, check_tokenizer

    try:
        check_architecture(AutoConfig.from_pretrained(script.model_name_or_path))
        tokenizer = AutoTokenizer.from_pretrained(script.model_name_or_path)
        check_tokenizer(tokenizer, script.rewards)
    except (DoctorMismatchError, OSError) as e:
        raise SystemExit(f"llmdoctor train: --model {script.model_name_or_path}: {e}") from None
    return tokenizer


def run_train(argv) -> str:
    """Runs ``llmdoctor train ARGV...``; returns the output checkpoint path."""
    from llmdoctor_train.stage2.trainer import ResumeCheckpointError, TFPOTrainer

    script, config = parse_args(argv)
    train_ds, eval_ds = _load_rewards(script.rewards, script.eval_split)
    train_ds, eval_ds = _select_rewards(train_ds, script.dimension), _select_rewards(eval_ds, script.dimension)
    tokenizer = _check_doctor(script)
    config = _with_eval(config, eval_ds is not None)
    trainer = TFPOTrainer(script.model_name_or_path, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                          processing_class=tokenizer, peft_config=script.peft_config(),
                          reference_model=script.reference)
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
