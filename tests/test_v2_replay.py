"""Model Runner V2's call sequence, replayed on CPU against the plugin.

MRV2 runs only on CUDA. This harness drives the processor the way ``vllm/v1/worker/gpu/
model_runner.py`` does each step: ``finish_requests`` (finished and preempted requests free their
slot: the processor is not told), ``add_requests`` (a slot from the free list, its tokens written
to the token table, ``add_request`` on the last pipeline stage), ``sampler.apply_staged_writes()``,
then ``apply(logits, ctx)`` with the step's rows in scheduler order. Prompts longer than the token
budget prefill over several steps (their samples are discarded), a request may sit out a step,
pipeline micro-batches alternate, a preempted request comes back with its output so far. The
tokens must equal the real V1 engine's for the same requests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tests.helpers import PROMPTS, run, sp

MAX_REQS, MAX_LEN, BUDGET = 4, 256, 16


class RunnerState:
    """The slice of MRV2's ``RequestState`` the runner keeps per slot (token table, lengths, free list)."""

    def __init__(self, vocab):
        self.device = torch.device("cpu")
        self.max_num_reqs, self.vocab_size = MAX_REQS, vocab
        self.all_token_ids = SimpleNamespace(gpu=torch.zeros((MAX_REQS, MAX_LEN), dtype=torch.int32))
        self.prompt_len = SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32))
        self.prefill_len = SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32))
        self.total_len = SimpleNamespace(np=np.zeros(MAX_REQS, dtype=np.int32))
        self.free_indices = list(range(MAX_REQS))
        self.index_to_req_id: dict[int, str] = {}


@dataclass
class Req:
    name: str
    prompt: list
    params: object
    max_tokens: int
    out: list = field(default_factory=list)
    slot: int = -1
    computed: int = 0  # tokens the patient has computed of prompt + out


class Replay:
    """A toy MRV2 model runner: the patient in transformers, the plugin as its custom processor."""

    def __init__(self, proc, state, patient):
        self.proc, self.state, self.patient = proc, state, patient

    def add(self, r: Req):
        s = self.state
        r.slot = s.free_indices.pop()
        s.index_to_req_id[r.slot] = r.name
        tokens = r.prompt + r.out  # a resumed request refeeds its output so far
        s.prompt_len.np[r.slot], s.prefill_len.np[r.slot] = len(r.prompt), len(tokens)
        s.all_token_ids.gpu[r.slot, : len(tokens)] = torch.tensor(tokens)
        r.computed = 0
        self.proc.add_request(r.slot, r.params)

    def free(self, r: Req):
        self.state.index_to_req_id.pop(r.slot)
        self.state.free_indices.append(r.slot)
        r.slot = -1

    def step(self, batch: list[Req], spec_rows: int = 0):
        """One engine step over ``batch`` (scheduler order), under a token budget."""
        from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

        self.proc.apply_staged_writes()
        budget, lens, scheduled = BUDGET, [], []
        for r in batch:  # what does not fit in the budget waits for a later step
            context = len(r.prompt) + len(r.out)
            take = min(context - r.computed, budget)
            if take > 0:
                budget -= take
                lens.append(r.computed + take)
                scheduled.append(r)
        batch = scheduled
        with torch.no_grad():
            logits = torch.stack([self.patient(torch.tensor([(r.prompt + r.out)[:n]])).logits[0, -1]
                                  for r, n in zip(batch, lens)]).float()
        slots = np.array([r.slot for r in batch], dtype=np.int32)
        lens_np = np.array(lens, dtype=np.int32)
        table = self.state.all_token_ids.gpu
        ids = table[torch.from_numpy(slots).long(), torch.from_numpy(lens_np - 1).long()]
        rows = len(batch) + spec_rows
        ctx = LogitsContext(expanded_idx_mapping=torch.from_numpy(slots), idx_mapping=torch.from_numpy(slots),
                            idx_mapping_np=slots, expanded_local_pos=torch.zeros(rows, dtype=torch.int32),
                            input_ids=ids, pos=torch.from_numpy(lens_np - 1), seq_lens_upper_bound_np=lens_np)
        if spec_rows:
            logits = torch.cat([logits, logits[:spec_rows]])
        out = self.proc.apply(logits.clone(), ctx)
        if spec_rows:
            return torch.equal(out, logits)
        for r, n, row in zip(batch, lens, out):
            r.computed = n
            if n == len(r.prompt) + len(r.out):  # not a partial prefill: the sample counts
                tok = int(row.argmax())
                table[r.slot, n] = tok
                r.out.append(tok)
        return True


@pytest.fixture()
def replay(tiny, hf_models, tmp_path, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState

    from llmdoctor_vllm.processor import GuidanceLogitsProcessor

    monkeypatch.setenv("LLMDOCTOR_STATS_FILE", str(tmp_path / "stats.json"))
    cfg = {"llmdoctor": {"doctors": tiny["doctors"], "beta": 0.0}}
    vllm_config = EngineArgs(model=tiny["patient"], dtype="float32", max_model_len=MAX_LEN, max_num_seqs=MAX_REQS,
                             enforce_eager=True, additional_config=cfg).create_engine_config()
    state = RunnerState(vocab=384)
    proc = GuidanceLogitsProcessor(vllm_config, LogitsProcRequestState.from_request_state(state))
    assert proc.v2 and proc.core is not None and proc._finished is not None
    return Replay(proc, state, hf_models[0]), tmp_path / "stats.json"


def test_replayed_runner_equals_the_v1_engine(replay, engine, tiny):
    """Six requests through four slots: long prompts prefilled in 16-token chunks beside decodes, a
    request that sits out a step (its doctor cache is kept), pipeline micro-batches alternating,
    a request preempted and resumed, finished slots reused without a removal call. Every guided
    request's tokens equal the V1 engine's; afterwards nothing is guided or cached, the stats file
    says so, and the resumption was counted."""
    rp, stats = replay
    tok = tiny["tokenizer"]
    long = " ".join(["The cat kindly helps the doctor."] * 6 + [PROMPTS[3]])
    texts = [PROMPTS[0], long, PROMPTS[1], PROMPTS[2], long, PROMPTS[3]]
    guides = [{"beta": 1.0, "doctors": "doctor0"}, {"beta_lora": 2.0, "rule": "delta", "patient_min_p": 0.3}, {},
              {"beta_doctor1": 1.2, "beta_lora": 0.5}, {"beta_doctor0": 1.5}, {"beta": 0.7, "rule": "delta"}]
    lengths = [10, 8, 6, 12, 6, 9]
    params = [sp(guide=g, max_tokens=n) for g, n in zip(guides, lengths)]
    want = [run(engine, [t], [p])[0][0] for t, p in zip(texts, params)]
    unmasked = sp(guide={k: v for k, v in guides[1].items() if k != "patient_min_p"}, max_tokens=lengths[1])
    assert run(engine, [texts[1]], [unmasked])[0][0] != want[1]  # the support mask changes r1's reply
    reqs = [Req(f"r{i}", tok(t)["input_ids"], p, n) for i, (t, p, n) in enumerate(zip(texts, params, lengths))]
    waiting, running, step = list(reqs), [], 0
    preempted = False
    while waiting or running:
        while waiting and rp.state.free_indices:
            rp.add(waiting[0])
            running.append(waiting.pop(0))
        batch = list(running)
        if step == 3 and len(batch) > 2:  # the scheduler leaves one request out of this step
            sat_out = batch.pop(1)
            held = rp.proc.core.streams[sat_out.slot].copy()
        if 6 <= step < 12:  # two pipeline micro-batches: the last stage sees them in turn
            batch = batch[step % 2::2] or batch
        decoding = [r for r in running if r.params.extra_args and len(r.out) >= 3]
        if not preempted and decoding:  # preempt a guided request mid-reply; it comes back with its output
            victim = decoding[-1]
            running.remove(victim)
            rp.free(victim)
            waiting.insert(0, victim)
            batch = [r for r in batch if r is not victim]
            preempted = True
        if batch:
            rp.step(batch)
        if step == 3 and "sat_out" in locals():
            assert (rp.proc.core.streams[sat_out.slot] == held).all()  # kept, not released
        for r in [r for r in running if len(r.out) >= r.max_tokens]:
            running.remove(r)
            rp.free(r)  # finish_requests: the processor is not told
        step += 1
    assert [r.out for r in reqs] == want
    rp.proc.apply_staged_writes()  # the next step: every finished slot is seen free
    core = rp.proc.core
    assert core.num_guided == 0 and core.resumed == 1
    written = json.loads(stats.read_text())
    assert written["guided_requests"] == 0 and written["resumed"] == 1
    assert all(v == {"streams": 0, "blocks": 0} for k, v in written.items() if isinstance(v, dict))


def test_speculative_rows_are_left_alone(replay, tiny):
    """Rows per draft token (refused at start; if they arrive anyway) leave the logits untouched."""
    rp, _ = replay
    r = Req("s", tiny["tokenizer"](PROMPTS[0])["input_ids"], sp(guide={"beta": 1.0}), 4)
    rp.add(r)
    assert rp.step([r], spec_rows=1)


def test_fault_in_the_token_source_does_not_take_the_engine_down(replay, tiny):
    """An exception while reading the runner's token table leaves that step's requests unguided."""
    rp, _ = replay
    r = Req("f", tiny["tokenizer"](PROMPTS[1])["input_ids"], sp(guide={"beta": 1.0}), 4)
    rp.add(r)

    class Broken:
        device = torch.device("cpu")

        def __getitem__(self, index):
            raise RuntimeError("token table unreadable")

    rp.proc.req_states = SimpleNamespace(all_token_ids=SimpleNamespace(gpu=Broken()))
    rp.step([r])
    assert rp.proc.core.num_guided == 0 and len(r.out) == 1  # served, unguided, logged
