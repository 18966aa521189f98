"""Teacher-forced log-probs of responses under the patient: vLLM (the pipeline) and transformers (reference).

Both take ``pairs`` of ``(prompt_ids, response_ids)`` and return, per pair, a float64 array
``log π(response_t | prompt, response_<t)`` with one entry per response token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

Pairs = Sequence[tuple[Sequence[int], Sequence[int]]]


def build_engine(patient: str, **engine_kwargs):
    """An offline ``vllm.LLM`` serving the patient (``engine_kwargs`` go to ``LLM`` as given)."""
    from vllm import LLM

    return LLM(model=patient, **engine_kwargs)


def engine_max_len(llm) -> int:
    """The engine's context length (prompt + response must fit)."""
    return int(llm.llm_engine.model_config.max_model_len)


def score_with_vllm(llm, pairs: Pairs, *, use_tqdm: bool = False) -> list[np.ndarray]:
    """Scores all ``pairs`` in one ``generate`` call from the engine's prompt log-probs.

    ``SamplingParams(max_tokens=1, prompt_logprobs=0)`` returns, for every prompt position but
    the first, the log-prob of the actual prompt token; the response's are the last
    ``len(response)`` of them. Prompt log-probs are log-softmax of the raw logits whatever the
    engine's ``logprobs_mode`` (unless it asks for logits, refused here), and requests asking
    for them skip reading the prefix cache, so every position is computed.
    """
    from vllm import SamplingParams, TokensPrompt

    mode = getattr(llm.llm_engine.model_config, "logprobs_mode", "raw_logprobs")
    if "logits" in str(mode):
        raise ValueError(f"engine logprobs_mode={mode!r} returns logits; Stage 1 needs log-probs")
    if not pairs:
        return []
    if any(len(p) == 0 or len(r) == 0 for p, r in pairs):
        raise ValueError("every pair needs prompt and response tokens (an empty prompt leaves y_1 unscored)")
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, flat_logprobs=True, detokenize=False)
    prompts = [TokensPrompt(prompt_token_ids=[*p, *r]) for p, r in pairs]
    outs = llm.generate(prompts, params, use_tqdm=use_tqdm)
    return [_response_logprobs(o.prompt_logprobs, p, r) for (p, r), o in zip(pairs, outs)]


def _response_logprobs(plp, prompt, response) -> np.ndarray:
    """The response tokens' entries of one request's prompt log-probs (flat or list-of-dicts form)."""
    n_p, n_r = len(prompt), len(response)
    if hasattr(plp, "start_indices"):  # FlatLogprobs: one entry per position after the first
        if len(plp.logprobs) != n_p + n_r - 1:
            raise RuntimeError(f"vLLM returned {len(plp.logprobs)} prompt log-probs for {n_p + n_r} tokens")
        ids = np.asarray(plp.token_ids[n_p - 1:])
        out = np.asarray(plp.logprobs[n_p - 1:], dtype=np.float64)
    else:  # list: None for the first position, then {token_id: Logprob}
        ids = np.asarray(list(response))
        out = np.asarray([d[t].logprob for d, t in zip(plp[n_p:], response)], dtype=np.float64)
    if ids.shape != (n_r,) or (ids != np.asarray(response)).any():
        raise RuntimeError("vLLM's prompt log-probs are not for the response tokens sent")
    return out


def score_with_hf(model, pairs: Pairs, *, device=None) -> list[np.ndarray]:
    """Reference scorer with a transformers causal LM, one sequence per forward pass (tests, small runs)."""
    import torch

    device = device or next(model.parameters()).device
    out = []
    with torch.no_grad():
        for p, r in pairs:
            ids = torch.tensor([[*p, *r]], device=device)
            logits = model(ids).logits[0, len(p) - 1:-1].float()
            lp = torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None])[:, 0]
            out.append(lp.double().cpu().numpy())
    return out
