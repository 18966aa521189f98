"""What the tests share besides fixtures (``conftest.py``): the tiny-engine settings, prompts and
request helpers, and the Stage 3 formula computed independently with transformers, by teacher forcing."""

from __future__ import annotations

import torch

from llmdoctor_train.toy.pipeline import engine_kwargs

# the project's tiny-engine settings, with a small KV budget and few slots (rows get reused and moved)
ENGINE_KW = engine_kwargs(kv_cache_memory_bytes=16 << 20, max_model_len=256, max_num_seqs=4,
                          logprobs_mode="processed_logprobs")

PROMPTS = ["The cat kindly", "A dog quickly helps", "Our team", "The teacher writes a letter. My friend"]


V2_MAX_REQS, V2_MAX_LEN = 4, 256


def v2_processor(tiny):
    """The plugin under Model Runner V2's interface on CPU, over the tiny pair's doctors (default β 0):
    ``(processor, token table)``, the table standing in for the runner's per-slot token ids on the device."""
    from types import SimpleNamespace

    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    cfg = {"llmdoctor": {"doctors": tiny["doctors"], "beta": 0.0}}
    vllm_config = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=V2_MAX_LEN,
                             max_num_seqs=V2_MAX_REQS, enforce_eager=True,
                             additional_config=cfg).create_engine_config()
    table = SimpleNamespace(gpu=torch.zeros((V2_MAX_REQS, V2_MAX_LEN), dtype=torch.int32))
    state = LogitsProcRequestState(device=torch.device("cpu"), max_num_reqs=V2_MAX_REQS, vocab_size=384,
                                   all_token_ids=table, prompt_len=None, prefill_len=None, total_len=None)
    return GuidanceLogitsProcessor(vllm_config, state), table


def sp(**kw):
    """``SamplingParams``: greedy, 16 tokens unless told; ``guide={"beta": ...}`` becomes ``llmdoctor_*`` args."""
    from vllm import SamplingParams

    extra = {f"llmdoctor_{k}": v for k, v in kw.pop("guide", {}).items()}
    return SamplingParams(max_tokens=kw.pop("max_tokens", 16), temperature=kw.pop("temperature", 0.0),
                          extra_args=extra or None, **kw)


def run(engine, prompts, params):
    """Generates; returns (token ids of each first completion, vLLM's outputs)."""
    outs = engine.generate(prompts, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], outs


def _next_token_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """log p(. | ids[:t]) for t = start..len(ids)-1 ... len(ids): ``[len(ids) - start + 1, V]``."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits[start - 1:], dim=-1)


def guided_scores(patient, doctors, prompt_ids, output_ids, alpha=1.0, betas=None, rule="product",
                  patient_min_p=0.0):
    """``[len(output_ids), V]`` guided scores ``alpha*lp + sum beta*(ld [- lref])`` at every step.

    ``doctors`` maps a name to a ``LoadedDoctor``; ``betas`` maps a name to its weight. With
    ``patient_min_p``, tokens whose patient probability is below that fraction of the top one
    that can be produced score ``-inf``.
    """
    ids = list(prompt_ids) + list(output_ids[:-1])
    p = len(prompt_ids)
    lp = _next_token_logprobs(patient, ids, p)
    out = alpha * lp
    vocab = out.shape[1]
    for name, beta in (betas or {}).items():
        if not beta:
            continue
        doc = doctors[name]
        ld = _next_token_logprobs(doc.model, ids, p)
        if rule == "delta":
            if doc.is_lora:
                with doc.model.disable_adapter():
                    ld = ld - _next_token_logprobs(doc.model, ids, p)
            else:
                ld = ld - _next_token_logprobs(doc.reference_model, ids, p)
        v = min(vocab, ld.shape[1])
        out[:, :v] += beta * ld[:, :v]
        out[:, v:] = float("-inf")
    if patient_min_p:  # relative to the top token the step can produce (within every doctor's vocabulary)
        probs = lp.exp().masked_fill(torch.isneginf(out), 0.0)
        out[probs < patient_min_p * probs.max(dim=-1, keepdim=True).values] = float("-inf")
    return out


def v2_context(slots, lens, table):
    """The ``LogitsContext`` MRV2's sampler passes for one step: rows ``slots`` with ``lens`` tokens each,
    the last of them (the token fed this step) read from ``table``."""
    import numpy as np
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

    slots = np.asarray(slots, dtype=np.int32)
    lens = np.asarray(lens, dtype=np.int32)
    inputs = table.gpu[torch.from_numpy(slots).long(), torch.from_numpy(lens - 1).long()]
    idx = torch.from_numpy(slots)
    return LogitsContext(expanded_idx_mapping=idx, idx_mapping=idx, idx_mapping_np=slots,
                         expanded_local_pos=torch.zeros(len(slots), dtype=torch.int32), input_ids=inputs,
                         pos=torch.from_numpy(lens - 1), seq_lens_upper_bound_np=lens)
