"""Stage 1 end to end: preference data → patient log-probs (vLLM, in shards) → token-reward dataset.

Output folder layout::

    OUT/                 the dataset (``datasets.load_from_disk(OUT)``), one row per kept input row
    OUT/summary.json     rows, tokens, fraction of rewarded tokens, mean |r|, skipped rows, settings,
                     and the patient tokenizer's fingerprint (``llmdoctor train`` checks the doctor's)
    OUT/shards/NNNNN/    the patient's log-probs per shard; a restart reuses finished ones
                         (safe to delete once the run is done; a rerun then rescores)

Columns of the output dataset, one row per kept input row, lists are per response token:

- ``row_index`` (the input row), ``prompt_ids`` (the bare prompt, no instruction: what the
  doctor sees), ``chosen_ids``, ``rejected_ids``;
- per dimension ``<d>``, for ``chosen`` and ``rejected``: ``{side}_rewards_<d>``, ``{side}_S_<d>``,
  ``{side}_logp_gap_<d>``, ``{side}_logp_pos_<d>``, ``{side}_logp_neg_<d>``;
- ``chosen_rewards``, ``rejected_rewards``, ``chosen_S``, ``rejected_S``, ``chosen_logp_gap``,
  ``rejected_logp_gap``: copies of the main dimension's columns (the first unless chosen).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from tqdm.auto import tqdm

from llmdoctor_train.stage1.data import PromptFormatter
from llmdoctor_train.stage1.rewards import EPS, THETA, Dimension, ragged_token_rewards, unique_instructions
from llmdoctor_train.stage1.scoring import plan_shards, raise_or_skip, score_shard, shard_is_done, write_shard


SIDES = (("chosen", 1.0), ("rejected", -1.0))


def _list(offsets: np.ndarray, values: np.ndarray) -> pa.ListArray:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(values.astype(np.float32)))


def reward_columns(table: pa.Table, config) -> pa.Table:
    """Adds the reward columns of every dimension to a shard table of log-probs (vectorised per column)."""
    index = {ins: k for k, ins in enumerate(unique_instructions(config.dimensions))}
    cols = {c: table.column(c) for c in ("row_index", "prompt_ids", "chosen_ids", "rejected_ids")}
    per_dim = {}
    for d in config.dimensions:
        for side, sign in SIDES:
            pos = table.column(f"{side}_logp_{index[d.positive]}").combine_chunks()
            neg = table.column(f"{side}_logp_{index[d.negative]}").combine_chunks()
            offsets = pos.offsets.to_numpy().astype(np.int64)
            offsets = offsets - offsets[0]
            lp, ln = pos.flatten().to_numpy(), neg.flatten().to_numpy()
            tr = ragged_token_rewards(lp, ln, offsets, np.full(len(pos), sign), config.theta, config.eps)
            per_dim[f"{side}_rewards_{d.name}"] = _list(offsets, tr.rewards)
            per_dim[f"{side}_S_{d.name}"] = _list(offsets, tr.S)
            per_dim[f"{side}_logp_gap_{d.name}"] = _list(offsets, tr.logp_gap)
            per_dim[f"{side}_logp_pos_{d.name}"] = _list(offsets, lp)
            per_dim[f"{side}_logp_neg_{d.name}"] = _list(offsets, ln)
    for kind in ("rewards", "S", "logp_gap"):
        for side, _ in SIDES:
            cols[f"{side}_{kind}"] = per_dim[f"{side}_{kind}_{config.main_dimension}"]
    return pa.table(cols | per_dim)


def _sums(ds, column: str) -> np.ndarray:
    """[tokens, rewarded tokens, Σ|r|, Σr] of a reward column, one arrow chunk at a time."""
    total = np.zeros(4)
    for chunk in ds.data.column(column).chunks:
        r = chunk.flatten().to_numpy().astype(np.float64)
        total += [r.size, np.count_nonzero(r), np.abs(r).sum(), r.sum()]
    return total


def _ratios(sums: np.ndarray) -> dict:
    n = max(sums[0], 1)
    return {"tokens": int(sums[0]), "fraction_rewarded": sums[1] / n, "mean_abs_reward": sums[2] / n,
            "mean_reward": sums[3] / n}


def _stats(ds, dims) -> dict:
    """Token counts, fraction of rewarded tokens and mean |r| (and mean r) per dimension and side."""
    out = {}
    for d in dims:
        by_side = {side: _sums(ds, f"{side}_rewards_{d.name}") for side, _ in SIDES}
        out[d.name] = {"positive": d.positive, "negative": d.negative, **_ratios(sum(by_side.values())),
                       **{side: _ratios(v) for side, v in by_side.items()}}
    return out


def finalise(out: Path, shard_paths: list[Path], config, run: dict, rows_in: int, bad: list) -> dict:
    """Writes the dataset into ``out`` and ``out/summary.json``; returns the summary."""
    from datasets import concatenate_datasets, load_from_disk

    shards = [load_from_disk(str(p)) for p in shard_paths]
    ds = concatenate_datasets(shards) if len(shards) > 1 else shards[0]
    cache = out / "shards" / "final.arrow"
    final = ds.with_format("arrow").map(
        reward_columns, fn_kwargs={"config": config}, batched=True, batch_size=max(config.shard_size, 1),
        remove_columns=ds.column_names, cache_file_name=str(cache), load_from_cache_file=False,
        new_fingerprint=f"rewards-{run['shards']}-{len(ds)}", desc="rewards")
    final = final.with_format(None)
    final.save_to_disk(str(out))
    stats = _stats(final, config.dimensions)
    main = stats[config.main_dimension]
    summary = {
        "rows": len(final), "rows_in_data": rows_in, "rows_skipped": len(bad),
        "skipped": [{"row": i, "reason": why} for i, why in bad[:1000]],
        "tokens": main["tokens"], "tokens_chosen": main["chosen"]["tokens"],
        "tokens_rejected": main["rejected"]["tokens"], "fraction_rewarded": main["fraction_rewarded"],
        "mean_abs_reward": main["mean_abs_reward"], "main_dimension": config.main_dimension,
        "theta": config.theta, "eps": config.eps, "dimensions": stats, **run,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    del final, ds, shards
    cache.unlink(missing_ok=True)
    return summary


log = logging.getLogger(__name__)


@dataclass
class RewardsConfig:
    """Settings of a Stage 1 run; the main reward columns come from ``main_dimension`` (default: the first)."""

    dimensions: list[Dimension] = field(default_factory=lambda: [Dimension("default")])
    main_dimension: str | None = None
    theta: float = THETA
    eps: float = EPS
    shard_size: int = 500
    skip_bad_rows: bool = False
    template: str = "auto"
    append_eos: bool = False
    split: str = "train"
    num_proc: int | None = None  # datasets.map workers for tokenising

    def __post_init__(self):
        names = [d.name for d in self.dimensions]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"dimension names must be given and unique, got {names}")
        self.main_dimension = self.main_dimension or names[0]
        if self.main_dimension not in names:
            raise ValueError(f"main dimension {self.main_dimension!r} is not one of {names}")
        if self.shard_size < 1:
            raise ValueError("shard_size must be >= 1")


def _assumed_max_len(llm, patient: str, engine_kwargs: dict) -> int | None:
    """The context length rows are checked against before (or without) starting the engine."""
    from llmdoctor_train.stage1.scoring import engine_max_len

    if llm is not None:
        return engine_max_len(llm)
    if engine_kwargs.get("max_model_len"):
        return int(engine_kwargs["max_model_len"])
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(patient)
    return getattr(cfg.get_text_config(), "max_position_embeddings", None)


def _prepare_output(out: Path) -> None:
    """Refuses a non-empty folder that is not a Stage 1 output; clears a previous final dataset."""
    if out.exists() and any(out.iterdir()) and not (out / "shards").is_dir():
        raise FileExistsError(f"--output {out} is a non-empty folder that holds no Stage 1 run; pick a new one")
    (out / "shards").mkdir(parents=True, exist_ok=True)
    for p in [*out.glob("data-*.arrow"), out / "state.json", out / "dataset_info.json", out / "summary.json",
              out / "shards" / "final.arrow"]:
        p.unlink(missing_ok=True)
    for p in (out / "shards").glob("*.tmp"):  # half-written shards of an interrupted run
        shutil.rmtree(p)


def _ident(path) -> str:
    """A model/tokenizer path as recorded with the shards (absolute when it is a local folder)."""
    return str(Path(path).resolve()) if path and Path(path).exists() else str(path)


def compute_rewards(data, patient: str, output: str | Path, config: RewardsConfig | None = None, *, llm=None,
                    tokenizer=None, engine_kwargs: dict | None = None, progress: bool = True) -> dict:
    """Scores every preference pair with the patient and writes the token-reward dataset and summary.

    ``data``: a path (see ``load_preferences``) or a ``datasets.Dataset``. ``llm``: a running
    ``vllm.LLM`` for the patient; without it one is started (``engine_kwargs``) only if some
    shard still needs scoring. ``tokenizer``: a tokenizer or its path (default: the patient's).
    Returns the summary (also written to ``OUT/summary.json``).
    """
    import datasets

    quiet = not datasets.are_progress_bars_disabled()
    if quiet:  # one bar for the run, not one per save_to_disk
        datasets.disable_progress_bars()
    try:
        return _compute(data, patient, output, config or RewardsConfig(), llm, tokenizer, dict(engine_kwargs or {}),
                        progress)
    finally:
        if quiet:
            datasets.enable_progress_bars()


def _compute(data, patient, output, config, llm, tokenizer, engine_kwargs, progress) -> dict:
    from transformers import AutoTokenizer

    from llmdoctor_train.stage1.data import BadRowError, DataError, check_columns, load_preferences
    from llmdoctor_train.stage1.scoring import build_engine, engine_max_len, score_with_vllm
    from llmdoctor_train.stage1.tokens import tokenize_preferences
    from llmdoctor_vllm.api import close_engine
    from llmdoctor_vllm.checkpoint import tokenizer_fingerprint

    ds = load_preferences(data, config.split) if isinstance(data, (str, Path)) else check_columns(data, "data")
    if len(ds) == 0:
        raise DataError(f"{data}: no rows")
    tok = tokenizer
    if tok is None or isinstance(tok, (str, Path)):
        tok = AutoTokenizer.from_pretrained(str(tok or patient))
    formatter = PromptFormatter(tok, config.template, config.append_eos)
    instructions = unique_instructions(config.dimensions)
    tokens = tokenize_preferences(ds, formatter, instructions, num_proc=config.num_proc)
    n_ins = len(instructions)
    max_len = _assumed_max_len(llm, patient, engine_kwargs)
    plans, bad = plan_shards(tokens, n_ins, config.shard_size, max_len)
    raise_or_skip(bad, config.skip_bad_rows)
    if not any(p.rows for p in plans):
        raise BadRowError(bad, hint="no row is left to score")
    out = Path(output)
    _prepare_output(out)
    settings = {"patient": _ident(patient), "tokenizer": _ident(getattr(tok, "name_or_path", "")),
                "template": formatter.mode,
                "append_eos": config.append_eos, "instructions": instructions}
    todo = [p for p in plans if not shard_is_done(out / "shards" / f"{p.index:05d}", p, settings)]
    own_engine = bool(todo) and llm is None
    if own_engine:
        llm = build_engine(patient, **engine_kwargs)
    try:
        if own_engine and engine_max_len(llm) != max_len:  # the engine settled on another length: check again
            max_len = engine_max_len(llm)
            plans, bad = plan_shards(tokens, n_ins, config.shard_size, max_len)
            raise_or_skip(bad, config.skip_bad_rows)
            todo = [p for p in plans if not shard_is_done(out / "shards" / f"{p.index:05d}", p, settings)]
        todo_ids, scored = {p.index for p in todo}, 0
        with tqdm(total=len(ds), unit="row", desc="Stage 1 rewards", disable=not progress) as bar:
            bar.set_postfix(shards_to_score=len(todo), skipped_rows=len(bad))
            for plan in plans:
                if plan.index in todo_ids:
                    table = score_shard(tokens, plan, n_ins, lambda pairs: score_with_vllm(llm, pairs))
                    write_shard(out / "shards" / f"{plan.index:05d}", table, plan, settings)
                    scored += 1
                    bar.set_postfix(shards_to_score=len(todo) - scored, skipped_rows=len(bad))
                bar.update(plan.stop - plan.start)
        for stale in (out / "shards").glob("[0-9]" * 5):  # shards beyond the data's end (a shorter rerun)
            if int(stale.name) >= len(plans):
                shutil.rmtree(stale)
        run = {"data": str(data) if isinstance(data, (str, Path)) else "<Dataset>", **settings,
               "shards": len(plans), "shards_reused": len(plans) - len(todo), "shards_computed": len(todo),
               "tokenizer_fingerprint": tokenizer_fingerprint(tok), "tokenizer_size": len(tok)}
        kept = [out / "shards" / f"{p.index:05d}" for p in plans if p.rows]  # an empty saved shard does not load back
        summary = finalise(out, kept, config, run, len(ds), bad)
    finally:
        if own_engine:  # not left to exit-time finalisers (see close_engine)
            close_engine(llm)
    log.info("Stage 1 rewards written to %s: %s", out, {k: summary[k] for k in ("rows", "tokens", "rows_skipped")})
    return summary
