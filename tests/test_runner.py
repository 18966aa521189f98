"""The doctor runner alone: incremental paged steps equal a full transformers forward, including
packed steps that mix prefill chunks, decodes and idle streams; a long prompt beside many decodes
runs in bounded shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmdoctor_train.toy.models import build_tiny_lm
from llmdoctor_vllm.packing import plan_step
from llmdoctor_vllm.runner import DoctorRunner


@pytest.fixture(scope="module")
def doctor():
    return build_tiny_lm(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                         vocab_size=96, max_position_embeddings=512, lm_head_std=None, seed=0)


@pytest.mark.parametrize("key_bucket", [1, 64])  # 64: keys read in rounded lengths, as on CUDA
def test_steps_equal_full_forward(doctor, key_bucket):
    """Three streams of different lengths, fed a prompt then one or two tokens per step, give the
    log-probs of a full forward over each stream's whole sequence at every step."""
    runner = DoctorRunner(doctor, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4, max_len=160,
                          block_size=16)
    runner.key_bucket = key_bucket
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, 96, size=n).tolist() for n in (5, 33, 17)]
    sids = np.array([runner.new_stream() for _ in seqs])
    feeds = [seqs] + [[rng.integers(0, 96, size=1 + (i + j) % 2).tolist() for j in range(3)] for i in range(6)]
    history = [[] for _ in seqs]
    for new in feeds:
        got = runner.step(sids, new)
        history = [h + t for h, t in zip(history, new)]
        with torch.inference_mode():
            want = [torch.log_softmax(doctor(torch.tensor([h])).logits[0, -1].float(), -1) for h in history]
        torch.testing.assert_close(got, torch.stack(want), atol=2e-5, rtol=0)
    assert runner.lengths[sids].tolist() == [len(h) for h in history]


def test_lora_rows_with_and_without_adapter(doctor):
    """A LoRA doctor stepped with some rows' adapter off (the delta rule's reference rows) gives
    those rows the base model's log-probs and the others the adapted model's, in one forward."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(doctor), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules="all-linear")).eval()
    runner = DoctorRunner(lora, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4, max_len=96)
    rng = np.random.default_rng(1)
    seqs = [rng.integers(0, 96, size=n).tolist() for n in (7, 12, 7, 3)]
    off = np.array([False, True, True, False])
    sids = np.array([runner.new_stream() for _ in seqs])
    history = [[] for _ in seqs]
    for new in [seqs, [[3], [4], [5], [6]], [[7, 8], [9], [10, 11], [12]]]:
        got = runner.step(sids, new, adapter_off=off)
        history = [h + t for h, t in zip(history, new)]
        with torch.inference_mode():
            adapted = [torch.log_softmax(lora(torch.tensor([h])).logits[0, -1], -1) for h in history]
            with lora.disable_adapter():
                base = [torch.log_softmax(lora(torch.tensor([h])).logits[0, -1], -1) for h in history]
        want = torch.stack([b if o else a for a, b, o in zip(adapted, base, off)])
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        assert (got[0] - base[0]).abs().max() > 1e-3  # the adapter does change the adapted rows


def test_delta_rows_need_plain_lora(doctor):
    """A DoRA doctor cannot run its adapter on and off in one batch here: a clear error (the core
    turns it into 'these requests continue unguided'), not a wrong answer."""
    import copy

    from peft import LoraConfig, get_peft_model

    dora = get_peft_model(copy.deepcopy(doctor), LoraConfig(r=4, use_dora=True, target_modules="all-linear")).eval()
    runner = DoctorRunner(dora, device="cpu", dtype=torch.float32, cache_tokens=256, max_streams=2, max_len=64)
    sids = np.array([runner.new_stream(), runner.new_stream()])
    runner.step(sids, [[1, 2], [3]])  # adapter on everywhere: peft's own forward, fine
    with pytest.raises(ValueError, match="plain LoRA"):
        runner.step(sids, [[4], [5]], adapter_off=np.array([False, True]))


def _full(model, seqs):
    with torch.inference_mode():
        return torch.stack([torch.log_softmax(model(torch.tensor([s])).logits[0, -1].float(), -1) for s in seqs])


@pytest.mark.parametrize("limits", [dict(), dict(prefill_chunk_tokens=7, q_tile=3, score_budget=64)])
def test_mixed_step_equals_full_forward(doctor, limits):
    """Streams that prefill in chunks of different sizes, decode, or gain nothing (a patient still
    prefilling a prompt the doctor has read) in the same steps give a full forward's log-probs;
    with tiny limits the same steps run as many passes, tiles and sub-batches."""
    runner = DoctorRunner(doctor, device="cpu", dtype=torch.float32, cache_tokens=1024, max_streams=6, max_len=300,
                          block_size=8, **limits)
    rng = np.random.default_rng(0)
    sids = np.array([runner.new_stream() for _ in range(4)])
    history = [[] for _ in sids]
    # per step, tokens per stream: 0 = nothing new (its previous distribution again)
    schedule = [(5, 40, 1, 17), (1, 0, 1, 9), (1, 0, 23, 1), (0, 33, 1, 1), (1, 1, 0, 1), (2, 1, 1, 0)]
    for counts in schedule:
        new = [rng.integers(0, 96, size=c).tolist() for c in counts]
        got = runner.step(sids, new)
        history = [h + t for h, t in zip(history, new)]
        torch.testing.assert_close(got, _full(doctor, history), atol=3e-5, rtol=0)
    assert runner.lengths[sids].tolist() == [len(h) for h in history]


def test_device_ids_and_lora_rows(doctor):
    """The ``(counts, ids)`` form with ids as a tensor, and LoRA rows with the adapter off, in a
    step that mixes a prefill with decodes."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    lora = get_peft_model(copy.deepcopy(doctor), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules="all-linear")).eval()
    runner = DoctorRunner(lora, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4, max_len=128,
                          prefill_chunk_tokens=16, q_tile=4)
    rng = np.random.default_rng(2)
    off = np.array([False, True, False])
    sids = np.array([runner.new_stream() for _ in off])
    history = [[] for _ in off]
    for counts in [(3, 3, 30), (1, 1, 1), (25, 1, 0)]:
        new = [rng.integers(0, 96, size=c).tolist() for c in counts]
        flat = torch.tensor([t for s in new for t in s], dtype=torch.int32)
        got = runner.step(sids, (np.array(counts), flat), adapter_off=off)
        history = [h + t for h, t in zip(history, new)]
        with lora.disable_adapter():
            base = _full(lora, history)
        want = torch.where(torch.from_numpy(off)[:, None], base, _full(lora, history))
        torch.testing.assert_close(got, want, atol=3e-5, rtol=0)


def test_long_prompt_next_to_decodes_runs_in_bounded_shapes():
    """A 32k-token prompt arriving beside 32 decoding streams: no pass holds more than the pass
    budget, no decode is padded to the prompt's length, and every attention group's scores stay
    within the budget (or are one tile); the packed tokens are exactly the new ones."""
    bs, max_len = 16, 40_000
    n = np.array([1] * 32 + [32_768])
    cached = np.array([2048] * 32 + [0])
    tables = np.arange(33 * (max_len // bs)).reshape(33, -1)
    heads, budget, max_pass, q_tile = 12, 1 << 25, 2048, 256
    plan = plan_step(n, cached, tables, bs, prefill_chunk_tokens=max_pass, q_tile=q_tile, score_budget=budget,
                     num_heads=heads)
    assert len(plan.src) == n.sum()
    assert sorted(plan.src.tolist()) == list(range(n.sum()))
    assert all(p.end - p.start <= max_pass for p in plan.passes)
    for p in plan.passes:
        for g in p.groups:
            G, Q = g.q_index.shape
            L = g.read.shape[1]
            assert G == 1 or G * Q * L * heads <= budget
            assert Q <= q_tile and g.q_valid.sum() == len(set(g.q_index[g.q_valid].tolist()))
    first = plan.passes[0]
    decode = [g for g in first.groups if g.q_index.shape[1] == 1]
    assert sum(len(g.q_index) for g in decode) == 32 and max(g.read.shape[1] for g in decode) == 2049


def test_a_decode_step_takes_the_short_path_to_the_general_layout():
    """A step that feeds every stream one token (no tiles: the CPU kernel's case) is laid out directly;
    its tokens, positions, pool rows and last tokens are the general plan's, and a step with a
    longer feed still takes the general plan."""
    bs, heads = 8, 4
    cached = np.array([0, 7, 8, 31, 5])
    tables = np.arange(5 * 4)[::-1].reshape(5, 4).copy()
    kw = dict(prefill_chunk_tokens=64, q_tile=16, score_budget=1 << 20, num_heads=heads, tiles=False)
    short = plan_step(np.ones(5, dtype=np.int64), cached, tables, bs, **kw)
    general = plan_step(np.array([1, 1, 1, 1, 2]), np.append(cached[:4], cached[4]), tables, bs, **kw)
    assert short.one_each and not general.one_each
    for field in ("src", "stream", "pos", "write"):
        np.testing.assert_array_equal(getattr(short, field), getattr(general, field)[:5])
    p = short.passes[0]
    assert len(short.passes) == 1 and (p.start, p.end) == (0, 5)
    np.testing.assert_array_equal(p.last_token, np.arange(5))
    np.testing.assert_array_equal(p.last_stream, np.arange(5))
    np.testing.assert_array_equal(short.write, tables[np.arange(5), cached // bs] * bs + cached % bs)


def _static_matches_packed(model, off=None, streams=5):
    """Steps the same streams through a packed runner and a static-bucket one; compares every step."""
    kw = dict(device="cpu", dtype=torch.float32, cache_tokens=2048, max_streams=8, max_len=200, block_size=8)
    packed, static = DoctorRunner(model, **kw), DoctorRunner(model, **kw)
    static.enable_static_decode(max_batch=8, capture=False, key_start=8)
    rng = np.random.default_rng(3)
    live: list[tuple[int, int, list]] = []  # (packed sid, static sid, tokens so far)
    # (streams joining with a prompt, streams leaving) per step; decode-only steps in between
    events = {0: (1, 0), 3: (1, 0), 6: (2, 0), 9: (1, 0), 13: (0, 4), 17: (3, 0), 21: (0, 2)}
    for step in range(26):
        join, leave = events.get(step, (0, 0))
        for a, b, _ in live[:leave]:
            packed.free_stream(a)
            static.free_stream(b)
        live = live[leave:] + [(packed.new_stream(), static.new_stream(), []) for _ in range(join)]
        new = [rng.integers(0, 96, size=(int(rng.integers(2, 12)) if not h else 1)).tolist() for _, _, h in live]
        rows_off = None if off is None else np.array([i % 2 == 1 for i in range(len(live))])
        want = packed.step(np.array([a for a, _, _ in live]), new, adapter_off=rows_off)
        got = static.step(np.array([b for _, b, _ in live]), new, adapter_off=rows_off)
        torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
        assert (got.argmax(-1) == want.argmax(-1)).all()
        live = [(a, b, h + t) for (a, b, h), t in zip(live, new)]
    return static


def test_static_decode_equals_the_packed_step(doctor):
    """Decode-only steps over static padded buckets (batch 1/2/4/8, keys 8...256) give the packed
    step's log-probs: streams joining (their prefill stays eager) and leaving, bucket edges crossed."""
    static = _static_matches_packed(doctor)
    batches = {b for b, _ in static.static.buffers}
    keys = {k for _, k in static.static.buffers}
    assert len(batches) >= 3 and len(keys) >= 3, static.static.buffers.keys()


def test_static_decode_with_adapter_off_rows(doctor):
    """A LoRA doctor's adapter-off rows (the delta rule's reference) in the same static step."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(2)
    lora = get_peft_model(copy.deepcopy(doctor), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                            target_modules="all-linear")).eval()
    assert _static_matches_packed(lora, off=True).static.buffers


@pytest.mark.parametrize("static", [False, True], ids=["packed", "static"])
def test_an_id_the_doctor_cannot_embed_poisons_only_its_stream(doctor, static):
    """A doctor with a smaller vocabulary (96) than its patient: a stream fed an id it cannot embed
    (96..patient's vocabulary, or negative) gets rows of NaN from then on, with no exception; the
    other streams of the same steps get the full forward's log-probs; a freed stream's id starts clean."""
    runner = DoctorRunner(doctor, device="cpu", dtype=torch.float32, cache_tokens=1024, max_streams=4, max_len=128,
                          block_size=8)
    if static:
        runner.enable_static_decode(max_batch=4, capture=False, key_start=8)
    rng = np.random.default_rng(5)
    sids = np.array([runner.new_stream() for _ in range(3)])
    seqs = [rng.integers(0, 96, size=n).tolist() for n in (6, 9, 4)]
    history = [list(s) for s in seqs]
    got = runner.step(sids, seqs)
    torch.testing.assert_close(got, _full(doctor, history), atol=2e-5, rtol=0)
    bad = {1: 130, 2: -3}  # a decode step in which two streams are fed ids the doctor cannot embed
    for i, new in enumerate([[[5], [130], [7]], [[8], [9], [-3]], [[11], [12], [13]]]):
        flat = torch.tensor([t for s in new for t in s])
        got = runner.step(sids, (np.ones(3, dtype=np.int64), flat) if i % 2 else new)
        history = [h + t for h, t in zip(history, new)]
        poisoned = [j for j, t in bad.items() if any(x == t for h in history[j:j + 1] for x in h)]
        for j in range(3):
            if j in poisoned:
                assert torch.isnan(got[j]).all()
            else:
                torch.testing.assert_close(got[j], _full(doctor, [history[j]])[0], atol=2e-5, rtol=0)
    assert torch.isnan(got[1:]).all() and torch.isfinite(got[0]).all()
    runner.free_stream(int(sids[1]))
    fresh = runner.new_stream()
    assert fresh == sids[1]
    torch.testing.assert_close(runner.step(np.array([fresh, sids[0]]), [[1, 2, 3], [4]]),
                               _full(doctor, [[1, 2, 3], history[0] + [4]]), atol=2e-5, rtol=0)


@pytest.mark.parametrize("key_bucket,static", [(1, False), (64, False), (1, True)])
def test_nan_in_the_pool_reaches_no_other_stream(doctor, key_bucket, static):
    """NaN over every pool row no live stream holds: a stream whose block table still names a
    finished stream's blocks, in a group with a longer tile (so it reads keys past its own end),
    stays finite and exact, packed and static. Attention runs in SDPA's math backend, which adds
    the mask to the scores as GPU kernels do (0 x NaN is NaN; CPU's fused kernel skips masked keys)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    runner = DoctorRunner(doctor, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4, max_len=120,
                          block_size=8)
    runner.key_bucket = key_bucket
    if static:
        runner.enable_static_decode(max_batch=4, capture=False, key_start=8)
    rng = np.random.default_rng(6)
    first, long = runner.new_stream(), runner.new_stream()
    history = [rng.integers(0, 96, size=n).tolist() for n in (60, 40)]
    runner.step(np.array([first, long]), history)
    runner.free_stream(first)
    held = np.zeros(runner.budget_tokens + 2, dtype=bool)
    for b in runner.block_table[long, :runner.num_stream_blocks[long]]:
        held[b * 8:(b + 1) * 8] = True
    held[runner.zero_row] = True
    with torch.inference_mode():
        runner.kv[:, torch.from_numpy(~held)] = float("nan")
    short = runner.new_stream()  # its table still lists the finished stream's blocks
    assert short == first
    sids = np.array([short, long])
    history = [[], history[1]]
    with sdpa_kernel(SDPBackend.MATH):
        for counts in [(3, 8), (1, 1), (2, 5), (1, 1)]:
            new = [rng.integers(0, 96, size=c).tolist() for c in counts]
            history = [h + t for h, t in zip(history, new)]
            torch.testing.assert_close(runner.step(sids, new), _full(doctor, history), atol=2e-5, rtol=0)


# -- vLLM's CPU paged-attention kernel (a head size it takes: 32) --------------------------------

@pytest.fixture(scope="module")
def paged_doctor():
    return build_tiny_lm(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128,
                         vocab_size=96, max_position_embeddings=512, lm_head_std=None, seed=3)


def _paged_runner(model, **kw) -> DoctorRunner:
    runner = DoctorRunner(model, device="cpu", dtype=torch.float32, max_streams=4, max_len=160, **kw)
    assert runner.paged is not None, "this vLLM CPU build should run the doctor's attention on its own kernel"
    return runner


@pytest.mark.parametrize("chunk", [2048, 7])  # 7: a prompt runs as several passes
def test_cpu_kernel_steps_equal_full_forward(paged_doctor, chunk):
    """With vLLM's CPU attention kernel: prompts, decodes, two-token feeds and idle streams, in one
    pass or several, give the full forward's log-probs; the SDPA path (the GPU's) gives the same."""
    runner = _paged_runner(paged_doctor, cache_tokens=512, block_size=16, prefill_chunk_tokens=chunk)
    sdpa = DoctorRunner(paged_doctor, device="cpu", dtype=torch.float32, cache_tokens=512, max_streams=4,
                        max_len=160, attention="sdpa")
    assert sdpa.paged is None
    rng = np.random.default_rng(7)
    seqs = [rng.integers(0, 96, size=n).tolist() for n in (5, 33, 17)]
    sids = np.array([runner.new_stream() for _ in seqs])
    sdpa_sids = np.array([sdpa.new_stream() for _ in seqs])
    history = [[] for _ in seqs]
    feeds = [seqs] + [[rng.integers(0, 96, size=(1 + (i + j) % 2) * (j != 2 or i % 3)).tolist() for j in range(3)]
                      for i in range(6)]
    for new in feeds:
        got = runner.step(sids, new)
        history = [h + t for h, t in zip(history, new)]
        torch.testing.assert_close(got, _full(paged_doctor, history), atol=2e-5, rtol=0)
        torch.testing.assert_close(got, sdpa.step(sdpa_sids, new), atol=2e-5, rtol=0)


def test_cpu_kernel_lora_rows_with_and_without_adapter(paged_doctor):
    """The delta rule's adapter-off rows beside adapted rows, through the CPU kernel."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    lora = get_peft_model(copy.deepcopy(paged_doctor), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                  target_modules="all-linear")).eval()
    runner = _paged_runner(lora, cache_tokens=512)
    rng = np.random.default_rng(8)
    off = np.array([False, True, True, False])
    sids = np.array([runner.new_stream() for _ in range(4)])
    history = [[] for _ in range(4)]
    for new in [[rng.integers(0, 96, size=n).tolist() for n in (7, 12, 7, 3)], [[3], [4], [5], [6]],
                [[7, 8], [9], [10, 11], [12]]]:
        got = runner.step(sids, new, adapter_off=off)
        history = [h + t for h, t in zip(history, new)]
        with torch.inference_mode():
            adapted = _full(lora, history)
            with lora.disable_adapter():
                base = _full(lora, history)
        torch.testing.assert_close(got, torch.where(torch.from_numpy(off)[:, None], base, adapted), atol=2e-5, rtol=0)


def test_cpu_kernel_nan_in_a_freed_block_reaches_no_other_stream(paged_doctor):
    """The kernel reads whole blocks: NaN over every block no live stream holds, then a new stream
    that takes those blocks (with keys past its end in its last block) stays finite and exact,
    because a block is cleared when a stream takes it."""
    runner = _paged_runner(paged_doctor, cache_tokens=256, block_size=16)
    rng = np.random.default_rng(9)
    first, long = runner.new_stream(), runner.new_stream()
    history = [rng.integers(0, 96, size=n).tolist() for n in (60, 40)]
    runner.step(np.array([first, long]), history)
    runner.free_stream(first)
    held = np.zeros(runner.num_blocks, dtype=bool)
    held[runner.block_table[long, :runner.num_stream_blocks[long]]] = True
    with torch.inference_mode():
        runner.kv[:, torch.from_numpy(~held)] = float("nan")
    short = runner.new_stream()
    sids = np.array([short, long])
    history = [[], history[1]]
    for counts in [(3, 1), (1, 1), (20, 2), (1, 1)]:
        new = [rng.integers(0, 96, size=c).tolist() for c in counts]
        history = [h + t for h, t in zip(history, new)]
        torch.testing.assert_close(runner.step(sids, new), _full(paged_doctor, history), atol=2e-5, rtol=0)


def test_cpu_kernel_poisoned_stream(paged_doctor):
    """An id the doctor cannot embed makes only its own stream's rows NaN under the CPU kernel too."""
    runner = _paged_runner(paged_doctor, cache_tokens=512, block_size=16)
    sids = np.array([runner.new_stream() for _ in range(2)])
    history = [[1, 2, 3], [4, 5]]
    runner.step(sids, history)
    got = runner.step(sids, [[6], [500]])
    assert torch.isnan(got[1]).all()
    torch.testing.assert_close(got[0], _full(paged_doctor, [history[0] + [6]])[0], atol=2e-5, rtol=0)
