"""Stage 2 settings and data: :class:`TFPOConfig` (``TrainingArguments`` plus TFPO's),
:class:`DoctorModelConfig` (TRL's ``ModelConfig`` with a doctor's defaults) and :class:`TFPOCollator`, which pads Stage 1's token-reward records into one batch of chosen and
rejected rows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import TrainingArguments
from trl import ModelConfig

from llmdoctor_train.stage2.loss import WEIGHTINGS

REWARD_FIELDS = ("prompt_ids", "chosen_ids", "rejected_ids", "chosen_rewards", "rejected_rewards")
LOSS_TYPES = ("tfpo", "genarm")


def _opt(default, help_text: str, **metadata):
    return field(default=default, metadata={"help": help_text, **metadata})


@dataclass
class TFPOConfig(TrainingArguments):
    """``TrainingArguments`` plus TFPO's settings, as TRL's ``DPOConfig`` is ``TrainingArguments``
    plus DPO's; the defaults follow the paper's recipe (AdamW, batch 4, gradient clipping 1.0).

    As TRL's configs do, it changes a few ``TrainingArguments`` defaults (one epoch, log every 10
    steps, keep 2 checkpoints, warm up over the first 10% of the steps, a learning rate that
    depends on LoRA) and every field is a flag of ``llmdoctor train`` (``TrlParser``).
    """

    _VALID_DICT_FIELDS = TrainingArguments._VALID_DICT_FIELDS + ["model_init_kwargs"]

    # the objective (docs/method.md): L_SubTB + value_loss_weight * L_value
    value_loss_weight: float = _opt(0.1, "Weight of the value-discrimination loss: L_SubTB + value_loss_weight "
                                         "* L_value.")
    gamma: float = _opt(0.1, "Margin of the value-discrimination hinge.")
    subtb_weighting: str = _opt("all", "Subtrajectories in L_SubTB: 'all' pairs (O(L)), 'trajectory' (s_0 to "
                                       "s_L only), or 'lambda' (experimental: pair weight subtb_lambda^(n-m)).",
                                choices=list(WEIGHTINGS))
    subtb_lambda: float = _opt(0.9, "Experimental: SubTB's lambda for subtb_weighting='lambda', in (0, 1].")
    reward_scale: float = _opt(1.0, "TFPO fits reward_scale x Stage 1's rewards (a KL coefficient of 1/scale "
                                    "towards the reference).")
    reference_weight: float = _opt(1.0, "kappa in the flow target log Q = sum (r + kappa log pi_ref), in [0, 1]: "
                                        "the doctor's terminal distribution is pi_ref^kappa exp(sum r); 1 is the "
                                        "reference-relative target, 0 the paper's absolute one (sum r).")
    loss_type: str = _opt("tfpo", "'tfpo' (SubTB + value loss) or 'genarm' (GenARM's baseline loss).",
                          choices=list(LOSS_TYPES))
    genarm_beta: float = _opt(0.05, "beta_r of the GenARM loss.")
    # data and model
    dimension: str | None = _opt(None, "Train on the rewards of this preference dimension (Stage 1's columns "
                                       "chosen_rewards_<d>, rejected_rewards_<d>) instead of the main one.")
    max_length: int | None = _opt(1024, "Longest prompt+response in tokens; prompts are cut from the left "
                                        "first, then responses from the right.")
    value_head_inner_size: int | None = _opt(None, "Value head MLP width (default: the LM's hidden size).")
    model_init_kwargs: dict[str, Any] | str | None = _opt(
        None, "Keyword arguments of AutoModelForCausalLM.from_pretrained when the model is given by path "
              "(llmdoctor train fills them from --dtype, --model_revision, --attn_implementation); dtype "
              "defaults to float32, as AdamW keeps fp32 weights.")
    trained_for: str = _opt("", "What the doctor is for (e.g. 'helpfulness'), written to the manifest "
                                "(default: --dimension, else the loss type).")
    remove_unused_columns: bool = _opt(False, "Must stay False: the collator reads the reward columns.")
    ddp_find_unused_parameters: bool | None = _opt(
        False, "DDP: look for parameters without a gradient after each forward. Off: the value head runs after "
               "the model's forward, and DDP would count its parameters as unused and then again as ready.")
    # TrainingArguments fields with TFPO's defaults
    output_dir: str | None = _opt(None, "Where Trainer checkpoints go (each also a loadable doctor); "
                                        "llmdoctor train: default OUTPUT/checkpoints.")
    learning_rate: float | None = _opt(None, "AdamW learning rate (default: 5e-4 with LoRA, 5e-5 otherwise).")
    per_device_train_batch_size: int = _opt(4, "Preference pairs per device and step.")
    per_device_eval_batch_size: int = _opt(4, "Preference pairs per device in evaluation.")
    num_train_epochs: float = _opt(1.0, "Training epochs (max_steps > 0 overrides).")
    warmup_steps: float = _opt(0.1, "Linear warm-up: steps, or a fraction of the run when below 1 (default: "
                                    "10%% of the steps). A warm-up as long as the run is warned about.")
    logging_steps: float = _opt(10, "Log the loss and TFPO's metrics every N steps (or a fraction of the run).")
    save_total_limit: int | None = _opt(2, "Trainer checkpoints to keep.")
    resume_from_checkpoint: str | None = _opt(
        None, "Resume from this Trainer checkpoint; the flag alone (or 'last') takes the last one in output_dir.",
        nargs="?", const="last")

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"TFPOConfig: loss_type must be one of {LOSS_TYPES}, got {self.loss_type!r}")
        if not 0.0 <= self.reference_weight <= 1.0:
            raise ValueError(f"TFPOConfig: reference_weight must be in [0, 1], got {self.reference_weight}")
        if self.subtb_weighting not in WEIGHTINGS:
            raise ValueError(f"TFPOConfig: subtb_weighting must be one of {WEIGHTINGS}, got {self.subtb_weighting!r}")
        if not 0.0 < self.subtb_lambda <= 1.0:
            raise ValueError(f"TFPOConfig: subtb_lambda must be in (0, 1], got {self.subtb_lambda}")
        if self.dataloader_pin_memory and not torch.cuda.is_available():
            self.dataloader_pin_memory = False  # nothing to pin for (torch warns on every loader)
        if self.remove_unused_columns:
            raise ValueError("TFPOConfig: remove_unused_columns must stay False (the collator reads the rewards)")

    @property
    def uses_reference(self) -> bool:
        """Whether the objective reads ``log pi_ref`` (TFPO with ``reference_weight > 0``)."""
        return self.loss_type == "tfpo" and self.reference_weight > 0


@dataclass
class DoctorModelConfig(ModelConfig):
    """TRL's ``ModelConfig`` with a doctor's defaults: a LoRA adapter (rank 8, alpha 16) on every
    linear layer; ``--use_peft false`` trains all weights. ``--model`` is short for
    ``--model_name_or_path``."""

    model_name_or_path: str | None = _opt(None, "The doctor's starting causal LM (a local folder or a Hub id); "
                                                "it must use the patient's tokenizer.", aliases=["--model"],
                                          metavar="DOCTOR_BASE")
    use_peft: bool = _opt(True, "Train a LoRA adapter (false: train all weights).")
    lora_r: int = _opt(8, "LoRA rank.")
    lora_alpha: int = _opt(16, "LoRA alpha.")
    lora_target_modules: list[str] | None = field(
        default_factory=lambda: ["all-linear"], metadata={"help": "LoRA target modules, or all-linear."})

    def __post_init__(self):
        super().__post_init__()
        if not self.model_name_or_path:
            raise ValueError("the doctor's starting model is required: --model_name_or_path (or --model)")
        if self.use_peft and self.lora_r <= 0:
            raise ValueError(f"lora_r must be positive, got {self.lora_r} (--use_peft false trains all weights)")
        unsupported = [name for name in ("use_dora", "load_in_8bit", "load_in_4bit") if getattr(self, name)]
        if unsupported:
            raise ValueError(f"{', '.join(unsupported)}: the plugin serves plain LoRA adapters on unquantised "
                             "weights")

    def model_init_kwargs(self) -> dict:
        """``from_pretrained`` keyword arguments, as TRL's scripts pass them to their trainers."""
        return {"revision": self.model_revision, "attn_implementation": self.attn_implementation,
                "dtype": self.dtype}


@dataclass
class TFPOCollator:
    """Pads a batch of reward records into one batch of ``2B`` rows: the chosen, then the rejected.

    Returns ``input_ids``/``attention_mask`` ``[2B, T]`` (prompt + response, right-padded),
    ``response_start`` ``[2B]`` (position of ``y_1``), and ``response_ids``, ``response_mask``,
    ``rewards`` ``[2B, L]``. A pair shares one prompt truncation; an empty prompt becomes
    ``[bos_token_id]`` because ``s_0`` needs a hidden state.
    """

    pad_token_id: int
    max_length: int | None = None
    bos_token_id: int | None = None

    def _pair(self, ex: dict[str, Any]) -> tuple[list[int], list[list[int]], list[list[float]]]:
        missing = [f for f in REWARD_FIELDS if f not in ex]
        if missing:
            raise KeyError(f"TFPOCollator: example lacks field(s) {missing}; expected Stage 1's {REWARD_FIELDS}")
        prompt = list(ex["prompt_ids"])
        resp = [list(ex["chosen_ids"]), list(ex["rejected_ids"])]
        rew = [list(ex["chosen_rewards"]), list(ex["rejected_rewards"])]
        for name, ids, r in zip(("chosen", "rejected"), resp, rew):
            if len(ids) != len(r):
                raise ValueError(f"TFPOCollator: {name}_rewards has {len(r)} values for {len(ids)} {name}_ids tokens")
        if not prompt:
            if self.bos_token_id is None:
                raise ValueError("TFPOCollator: empty prompt_ids and no bos_token_id to stand for s_0")
            prompt = [self.bos_token_id]
        if self.max_length is not None:
            longest = max(len(resp[0]), len(resp[1]))
            keep = min(len(prompt), max(1, self.max_length - longest))
            prompt = prompt[len(prompt) - keep:]
            room = max(self.max_length - keep, 0)
            resp, rew = [x[:room] for x in resp], [x[:room] for x in rew]
        return prompt, resp, rew

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        pairs = [self._pair(ex) for ex in examples]
        rows = [(p, resp[i], rew[i]) for i in (0, 1) for p, resp, rew in pairs]  # chosen rows, then rejected
        T = max(len(p) + len(y) for p, y, _ in rows)
        L = max(1, max(len(y) for _, y, _ in rows))
        n = len(rows)
        input_ids = torch.full((n, T), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((n, T), dtype=torch.long)
        response_ids = torch.full((n, L), self.pad_token_id, dtype=torch.long)
        response_mask = torch.zeros((n, L), dtype=torch.bool)
        rewards = torch.zeros((n, L), dtype=torch.float32)
        start = torch.zeros(n, dtype=torch.long)
        for i, (p, y, r) in enumerate(rows):  # per sequence, not per token
            seq = p + y
            input_ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
            attention[i, :len(seq)] = 1
            start[i] = len(p)
            if y:
                response_ids[i, :len(y)] = torch.tensor(y, dtype=torch.long)
                response_mask[i, :len(y)] = True
                rewards[i, :len(y)] = torch.tensor(r, dtype=torch.float32)
        return {"input_ids": input_ids, "attention_mask": attention, "response_start": start,
                "response_ids": response_ids, "response_mask": response_mask, "rewards": rewards}
