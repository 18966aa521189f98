"""TFPO training of the doctor (Stage 2, docs/method.md) as a ``transformers.Trainer``, in the shape of
TRL's ``DPOTrainer``.

Inputs are Stage 1's token-reward records (``prompt_ids``, ``chosen_ids``, ``rejected_ids``,
``chosen_rewards``, ``rejected_rewards``: one reward per response token). The doctor is a
causal LM (optionally LoRA-wrapped with peft) plus a :class:`ValueHead` trained in full; the
head is registered as a submodule of the trained model so the optimizer, gradient clipping
and data parallelism see it. Checkpoints, intermediate and final, are the plugin's doctor
checkpoints (:func:`save_doctor`), so a Trainer checkpoint is also a loadable doctor and
carries the value head for resuming.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase, Trainer
from trl.trainer.utils import selective_log_softmax

from llmdoctor_vllm.checkpoint import VALUE_HEAD_NAME, DoctorCheckpointError, DoctorManifest, save_doctor
from llmdoctor_vllm.value_head import ValueHead
from llmdoctor_train.stage2.checks import check_architecture
from llmdoctor_train.stage2.config import REWARD_FIELDS, TFPOCollator, TFPOConfig
from llmdoctor_train.stage2.model_card import write_model_card
from llmdoctor_train.stage2.loss import genarm_loss, tfpo_objective
from llmdoctor_train.stage2.reference import logratio_metrics, reference_logp, start_at_reference

logger = logging.getLogger(__name__)

HEAD_MODULE = "llmdoctor_value_head"
TRAINING_ARGS_NAME = "training_args.bin"
TRAINER_STATE_NAME = "trainer_state.json"


class ResumeCheckpointError(DoctorCheckpointError):
    """A Trainer checkpoint to resume from is missing, incomplete or corrupt."""

    def __init__(self, path: str | os.PathLike, problem: str):
        super().__init__(path, problem)
        self.args = (f"llmdoctor train: cannot resume from checkpoint {os.fspath(path)!r}: {problem}",)


def _local_path(path: str | None) -> str | None:
    """An existing local folder as an absolute path (manifests resolve relative paths per checkpoint)."""
    if path and os.path.isdir(path):
        return str(Path(path).resolve())
    return path or None


def _load_lm(path: str, init_kwargs: dict | None):
    """``AutoModelForCausalLM.from_pretrained(path, **init_kwargs)``, in float32 unless told (as TRL's
    trainers load a model given by name from ``args.model_init_kwargs``)."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(init_kwargs or {})
    dtype = kwargs.get("dtype", "float32")
    kwargs["dtype"] = dtype if dtype in ("auto", None) or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def _hidden_size(config) -> int:
    size = getattr(config, "hidden_size", None)
    return int(size if size is not None else config.get_text_config().hidden_size)


@contextlib.contextmanager
def _head_detached(model: torch.nn.Module):
    """Takes the value head out of ``model`` for a while, so LM weights are saved/loaded without it."""
    head = model._modules.pop(HEAD_MODULE, None)
    try:
        yield head
    finally:
        if head is not None:
            model._modules[HEAD_MODULE] = head


def check_resume_checkpoint(path: str | os.PathLike, *, lora: bool, head: ValueHead) -> None:
    """Cheap checks of a checkpoint before resuming; raises :class:`ResumeCheckpointError`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    folder = Path(path)
    if not folder.is_dir():
        raise ResumeCheckpointError(path, "no such directory")
    try:
        json.loads((folder / TRAINER_STATE_NAME).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ResumeCheckpointError(path, f"unreadable {TRAINER_STATE_NAME}: {e}") from None
    try:
        manifest = DoctorManifest.read(folder)
    except DoctorCheckpointError as e:
        raise ResumeCheckpointError(path, e.problem) from None
    if (manifest.kind == "lora") != lora:
        raise ResumeCheckpointError(path, f"it holds a {manifest.kind} doctor but this run trains a "
                                          f"{'lora' if lora else 'full'} one")
    weights = ["adapter_model.safetensors"] if lora else ["model.safetensors", "model.safetensors.index.json"]
    present = [w for w in weights if (folder / w).is_file()]
    if not present:
        raise ResumeCheckpointError(path, f"missing model weights ({' or '.join(weights)})")
    if present[0].endswith(".safetensors"):
        try:
            with safe_open(str(folder / present[0]), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - truncated or garbage weights
            raise ResumeCheckpointError(path, f"corrupt {present[0]}: {e}") from None
    try:
        state = load_file(str(folder / VALUE_HEAD_NAME))
        ValueHead(head.hidden_size, head.inner_size).load_state_dict(state)
    except Exception as e:  # noqa: BLE001
        raise ResumeCheckpointError(path, f"missing, corrupt or mis-shaped {VALUE_HEAD_NAME}: {e}") from None


class TFPOTrainer(Trainer):
    """Trains a doctor LM + value head with TFPO (``L_SubTB + value_loss_weight * L_value``) or GenARM's loss.

    ``model`` is a causal LM or its path (loaded with ``args.model_init_kwargs``); with
    ``peft_config`` it is wrapped by ``peft.get_peft_model``. ``ref_model`` is a full doctor's
    starting weights, a path or a model: the delta rule's reference in the checkpoint and TFPO's
    frozen ``pi_ref`` (default: ``model``'s own path, or a copy of ``model``; a LoRA doctor's
    ``pi_ref`` is its adapter disabled). The value head becomes a submodule (``llmdoctor_value_head``) of the model
    it trains. Logged metrics: ``subtb``, ``value_loss``, ``flow_residual`` (mean ``|res(0, n)|``),
    ``pairs_ranked_right`` (fraction with ``sum log pi(y+) - sum log pi(y-) > 0``; of
    ``log pi - log pi_ref`` with a reference), ``logp_margin``, ``stage1_target``
    (``sum r(y+) - sum r(y-)``) and, with a reference, ``logratio_margin`` (the margin of
    ``log pi - log pi_ref``, which TFPO fits to ``stage1_target``).
    """

    def __init__(self, model, args: TFPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class: PreTrainedTokenizerBase | None = None, peft_config=None,
                 value_head: ValueHead | None = None, ref_model=None, data_collator=None,
                 callbacks=None, optimizers=(None, None), **kwargs):
        from transformers import AutoTokenizer, set_seed

        args = args or TFPOConfig(output_dir="tfpo_output")
        if not isinstance(args, TFPOConfig):
            raise TypeError("TFPOTrainer: args must be a TFPOConfig")
        train_dataset = self._prepare_dataset(train_dataset, args, "train")
        eval_dataset = self._prepare_dataset(eval_dataset, args, "eval")
        set_seed(args.seed)  # LoRA and value-head initialisation are reproducible
        if isinstance(model, (str, os.PathLike)):
            model_path = os.fspath(model)
            model = _load_lm(model_path, args.model_init_kwargs)
        else:
            model_path = getattr(model.config, "name_or_path", None) or None
        if processing_class is None:
            if not model_path:
                raise ValueError("TFPOTrainer: pass processing_class (the tokenizer shared with the patient)")
            processing_class = AutoTokenizer.from_pretrained(model_path)
        self.is_lora = peft_config is not None or hasattr(model, "peft_config")
        self.base_model_path = _local_path(model_path)
        given = ref_model if isinstance(ref_model, torch.nn.Module) else None
        ref_path = getattr(given.config, "name_or_path", None) if given is not None else ref_model
        self.reference_path = None if self.is_lora else _local_path(ref_path or model_path)
        frozen = None
        if args.uses_reference and not self.is_lora:  # a full doctor's pi_ref: its frozen starting weights
            if given is None:
                given = (_load_lm(self.reference_path, {"dtype": next(model.parameters()).dtype})
                         if self.reference_path else copy.deepcopy(model))
            frozen = given.eval().requires_grad_(False)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if self.is_lora and not model_path:
            self.base_model_path = _local_path(getattr(model.get_base_model().config, "name_or_path", None) or None)
        config = model.get_base_model().config if self.is_lora else model.config
        check_architecture(config)  # a doctor the plugin cannot serve fails here, not after training
        if args.learning_rate is None:
            args.learning_rate = 5e-4 if self.is_lora else 5e-5
        self.value_head = value_head or ValueHead(_hidden_size(config), args.value_head_inner_size)
        if value_head is None and args.uses_reference:
            start_at_reference(self.value_head)
        self.value_head.requires_grad_(args.loss_type == "tfpo")  # GenARM does not use the head
        model.add_module(HEAD_MODULE, self.value_head)  # so optimizer, clipping and DDP include it
        if data_collator is None:
            pad = processing_class.pad_token_id
            pad = processing_class.eos_token_id if pad is None else pad
            bos = processing_class.bos_token_id
            data_collator = TFPOCollator(pad_token_id=pad if pad is not None else 0, max_length=args.max_length,
                                         bos_token_id=bos if bos is not None else processing_class.eos_token_id)
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, **kwargs)
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False  # compute_loss returns a per-batch mean
        self._metrics: dict[str, dict[str, list]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.ref_model = None if frozen is None else self.accelerator.prepare_model(frozen, evaluation_mode=True)
        if not self.is_lora and not self.reference_path:
            logger.warning("TFPOTrainer: the starting weights have no path; the checkpoint will name no reference "
                           "for the delta rule (pass ref_model=...)")

    @staticmethod
    def _prepare_dataset(dataset, args: TFPOConfig, name: str):
        """Stage 1's reward dataset reduced to the five fields TFPO reads: with ``args.dimension``,
        that dimension's reward columns become ``chosen_rewards`` / ``rejected_rewards``.
        ``None`` stays ``None``; a dataset without column names (an iterable) is used as it is."""
        columns = getattr(dataset, "column_names", None)
        if dataset is None or not isinstance(columns, list):
            return dataset
        source = {f: f for f in REWARD_FIELDS}
        if args.dimension:
            source.update(chosen_rewards=f"chosen_rewards_{args.dimension}",
                          rejected_rewards=f"rejected_rewards_{args.dimension}")
        missing = [c for c in source.values() if c not in columns]
        if missing:
            raise ValueError(f"the {name} rewards dataset lacks column(s) {missing} (it has {columns}); was it "
                             "written by `llmdoctor rewards`?")
        dataset = dataset.select_columns(list(source.values()))
        renames = {src: dst for dst, src in source.items() if src != dst}
        return dataset.rename_columns(renames) if renames else dataset

    # ---- the loss ----

    def _response_terms(self, model, inputs, need_values: bool):
        """One forward over prompt+response: per-token ``log pi`` ``[N, L]`` and raw ``log V`` ``[N, L+1]``.

        Log-probs come from TRL's ``selective_log_softmax`` over the logits as the model returns
        them, one row at a time, so no float32 ``[N, L, V]`` copy of the logits is made.
        """
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    output_hidden_states=need_values, use_cache=False)
        ids = inputs["input_ids"]
        t, L = ids.shape[1], inputs["response_ids"].shape[1]
        rows, pos = self._state_positions(inputs)
        next_logp = selective_log_softmax(out.logits[:, :-1], ids[:, 1:]).float()  # [N, T-1]: log pi(ids[p+1] | :p)
        logp = next_logp[rows, pos[:, :L].clamp(max=t - 2)]  # past a response's end: padding, masked by the loss
        return logp, self._state_values(out, rows, pos) if need_values else None

    @staticmethod
    def _state_positions(inputs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rows [N, 1], pos [N, L+1])``: state ``s_k`` is the prefix ending at position
        ``start - 1 + k``; it predicts ``y_{k+1} = ids[start + k]`` (clamped to the row's end)."""
        ids = inputs["input_ids"]
        n, t = ids.shape
        L = inputs["response_ids"].shape[1]
        rows = torch.arange(n, device=ids.device)[:, None]
        return rows, (inputs["response_start"][:, None] - 1 + torch.arange(L + 1, device=ids.device)).clamp(max=t - 1)

    def _state_values(self, out, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Raw ``log V`` ``[N, L+1]`` of the value head on the last hidden states at the states' positions."""
        hidden = out.hidden_states[-1][rows, pos]
        head_dtype = next(self.value_head.parameters()).dtype
        return self.value_head(hidden.to(head_dtype)).float()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """TFPO or GenARM loss on a batch from :class:`TFPOCollator`, logging TFPO's metrics."""
        args: TFPOConfig = self.args
        tfpo = args.loss_type == "tfpo"
        logp, log_v = self._response_terms(model, inputs, need_values=tfpo)
        mask = inputs["response_mask"]
        B = mask.shape[0] // 2
        sum_logp = (logp * mask).sum(dim=1)
        margin = sum_logp[:B] - sum_logp[B:]
        metrics = {"pairs_ranked_right": (margin > 0).float().mean(), "logp_margin": margin.mean()}
        if tfpo:
            ref_logp = None
            if args.uses_reference:  # pi_ref: the adapter off (LoRA) or the frozen starting weights (full)
                ref_logp = reference_logp(self.accelerator.unwrap_model(model), self.ref_model, inputs,
                                          lambda m, x: self._response_terms(m, x, need_values=False)[0])
            loss, tfpo_metrics = tfpo_objective(logp, log_v, inputs, args, ref_logp)
            target = inputs["rewards"] * args.reward_scale  # what TFPO fits the log-ratio margin to
            metrics.update(tfpo_metrics, **logratio_metrics(logp, ref_logp, target, mask))
        else:
            loss = genarm_loss(sum_logp[:B], sum_logp[B:], beta_r=args.genarm_beta)
            metrics["genarm_loss"] = loss
        mode = "train" if model.training else "eval"
        for k, v in metrics.items():
            self._metrics[mode][k].append(v.detach())  # averaged over steps and ranks (one sync) at log time
        return (loss, {"logp": logp, "log_v": log_v}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation: the loss only (there are no labels or logits to return)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Adds the TFPO metrics since the last log, averaged over steps and over every process (as
        TRL's trainers gather theirs), not rank 0's alone."""
        mode = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if mode == "eval" else ""
        names = [k for k, vals in self._metrics[mode].items() if vals]
        if names:
            local = torch.stack([torch.stack(self._metrics[mode][k]).float().mean() for k in names])
            means = self.accelerator.reduce(local, reduction="mean")
            logs.update({prefix + k: v for k, v in zip(names, means.tolist())})
        self._metrics[mode].clear()
        super().log(logs, start_time)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """``Trainer.create_scheduler``, warning first when the warm-up is as long as the run."""
        warmup = self.args.get_warmup_steps(num_training_steps)
        if num_training_steps > 0 and warmup >= num_training_steps:
            logger.warning("TFPOTrainer: warm-up of %d steps for a run of %d: the learning rate never reaches "
                           "%g (pass warmup_steps as a fraction below 1, e.g. 0.1, or fewer steps)", warmup,
                           num_training_steps, self.args.learning_rate)
        return super().create_scheduler(num_training_steps, optimizer)

    def create_model_card(self, output_dir: str | None = None, dataset_name: str | None = None) -> None:
        """Writes ``README.md`` into the checkpoint folder: a model card saying what the doctor is and how to serve it."""
        if self.is_world_process_zero():
            write_model_card(output_dir or self.args.output_dir, self.args, base_model=self.base_model_path,
                             global_step=self.state.global_step, dataset_name=dataset_name)

    # ---- saving and resuming ----

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Writes a doctor checkpoint (adapter + base path for LoRA; full weights + reference otherwise)."""
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        model = self.accelerator.unwrap_model(self.model)
        args: TFPOConfig = self.args
        extra = {"loss_type": args.loss_type, "global_step": self.state.global_step}
        if args.loss_type == "tfpo":
            extra.update(subtb_weighting=args.subtb_weighting, value_loss_weight=args.value_loss_weight,
                         gamma=args.gamma, reward_scale=args.reward_scale, reference_weight=args.reference_weight)
        with _head_detached(model):
            save_doctor(output_dir, model, self.processing_class, self.value_head,
                        trained_for=args.trained_for or args.loss_type,
                        base_model=self.base_model_path if self.is_lora else None,
                        reference=self.reference_path, extra=extra)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        self.create_model_card(output_dir)

    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, **kwargs):
        """``Trainer.train``; a resume checkpoint is checked first (a bad one raises :class:`ResumeCheckpointError`)."""
        if resume_from_checkpoint:
            path = resume_from_checkpoint
            if isinstance(path, bool):
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
                if path is None:
                    raise ResumeCheckpointError(self.args.output_dir, "no checkpoint-* folder to resume from")
            check_resume_checkpoint(path, lora=self.is_lora, head=self.value_head)
            resume_from_checkpoint = path
        return super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restores the LM (or adapter) as ``Trainer`` does, then the value head."""
        from safetensors.torch import load_file

        try:
            with _head_detached(self.model):
                super()._load_from_checkpoint(resume_from_checkpoint, model)
            state = load_file(os.path.join(resume_from_checkpoint, VALUE_HEAD_NAME))
            self.value_head.load_state_dict(state)
        except ResumeCheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - say which checkpoint and why
            raise ResumeCheckpointError(resume_from_checkpoint, f"cannot restore the model: {e}") from e

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        try:
            super()._load_optimizer_and_scheduler(checkpoint)
        except Exception as e:  # noqa: BLE001
            raise ResumeCheckpointError(checkpoint, f"cannot restore optimizer/scheduler state: {e}") from e

    def _load_rng_state(self, checkpoint: str | None) -> None:
        try:
            super()._load_rng_state(checkpoint)
        except Exception as e:  # noqa: BLE001
            raise ResumeCheckpointError(checkpoint, f"cannot restore the random-number state: {e}") from e
