"""Stage 2 (TFPO): losses against brute force, gradients, the direction of training, checkpoints.

Everything runs on CPU with tiny random Qwen2 models from ``llmdoctor_train.toy.models``.
"""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from llmdoctor_train.stage2.loss import (first_divergence, genarm_loss, prefix_log_q, subtb_loss,
                                        value_discrimination_loss)

GOOD, BAD = 150, 151  # token ids the synthetic rewards favour / disfavour
R = math.tanh(1.0)  # a Stage 1 reward at mean importance


# ---------------------------------------------------------------- brute-force references

def brute_subtb(logp, rewards, log_v, lengths, weighting, subtb_lambda=0.9, ref=None):
    """The O(L^2) definition (docs/method.md), one sequence and one pair at a time; with ``ref``
    (log pi_ref per token) the reference-relative prefix score ``sum (r_k + log pi_ref(y_k))``."""
    per_seq = []
    for b, n in enumerate(lengths):
        if n == 0:
            continue
        logq = [0.0] + [float(sum(rewards[b][:k]) + (sum(ref[b][:k]) if ref else 0.0)) for k in range(1, n + 1)]
        logv = [float(log_v[b][k]) for k in range(n)] + [0.0]  # boundary: log V(s_n) = 0
        flow = [logq[k] + logv[k] for k in range(n + 1)]

        def residual(m, k):
            return flow[m] + sum(float(logp[b][j]) for j in range(m, k)) - flow[k]

        if weighting == "trajectory":
            per_seq.append(residual(0, n) ** 2)
            continue
        num = den = 0.0
        for m in range(n + 1):
            for k in range(m + 1, n + 1):
                w = 1.0 if weighting == "all" else subtb_lambda ** (k - m)
                num += w * residual(m, k) ** 2
                den += w
        per_seq.append(num / den)
    return sum(per_seq) / len(per_seq)


def random_batch(lengths, L, seed=0):
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    mask = torch.arange(L)[None, :] < torch.tensor(lengths)[:, None]
    logp = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    rewards = torch.randn(B, L, generator=g, dtype=torch.float64)
    log_v = torch.randn(B, L + 1, generator=g, dtype=torch.float64)
    # garbage in the padding must not matter
    logp = logp.masked_fill(~mask, 7.0)
    rewards = rewards.masked_fill(~mask, -5.0)
    return logp, rewards, log_v, mask


@pytest.mark.parametrize("weighting", ["all", "lambda", "trajectory"])
def test_subtb_equals_brute_force(weighting):
    lengths, L = [9, 3, 0, 6, 1], 9
    logp, rewards, log_v, mask = random_batch(lengths, L)
    fast = subtb_loss(logp, prefix_log_q(rewards, mask), log_v, mask, weighting=weighting, subtb_lambda=0.7)
    ref = brute_subtb(logp.tolist(), rewards.tolist(), log_v.tolist(), lengths, weighting, subtb_lambda=0.7)
    assert fast.item() == pytest.approx(ref, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("weighting", ["all", "lambda", "trajectory"])
def test_reference_target_equals_brute_force(weighting):
    from types import SimpleNamespace

    from llmdoctor_train.stage2.loss import tfpo_objective

    lengths, L = [9, 3, 0, 6], 9
    logp, rewards, log_v, mask = random_batch(lengths, L, seed=4)
    ref = (-torch.rand(len(lengths), L, dtype=torch.float64) * 3).masked_fill(~mask, 11.0)
    args = SimpleNamespace(subtb_weighting=weighting, subtb_lambda=0.7, value_loss_weight=0.0, gamma=0.1,
                           reward_scale=1.0, reference_weight=1.0)
    inputs = {"response_mask": mask, "rewards": rewards, "response_ids": torch.zeros(len(lengths), L, dtype=torch.long)}
    fast, _ = tfpo_objective(logp, log_v, inputs, args, ref_logp=ref)
    want = brute_subtb(logp.tolist(), rewards.tolist(), log_v.tolist(), lengths, weighting, subtb_lambda=0.7, ref=ref.tolist())
    assert fast.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # it is SubTB on log pi - log pi_ref with the paper's target
    shifted = brute_subtb((logp - ref).tolist(), rewards.tolist(), log_v.tolist(), lengths, weighting, subtb_lambda=0.7)
    assert fast.item() == pytest.approx(shifted, rel=1e-10, abs=1e-12)
    # reward_scale c fits c x the rewards
    args.reward_scale = 2.5
    scaled, _ = tfpo_objective(logp, log_v, inputs, args, ref_logp=ref)
    want = brute_subtb(logp.tolist(), (2.5 * rewards).tolist(), log_v.tolist(), lengths, weighting, subtb_lambda=0.7,
                       ref=ref.tolist())
    assert scaled.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    # reference_weight kappa: log Q = sum (c r + kappa log pi_ref); kappa = 0 is the absolute target
    for kappa in (0.5, 0.0):
        args.reward_scale, args.reference_weight = 1.0, kappa
        weighted, _ = tfpo_objective(logp, log_v, inputs, args, ref_logp=ref)
        want = brute_subtb(logp.tolist(), rewards.tolist(), log_v.tolist(), lengths, weighting, subtb_lambda=0.7,
                           ref=(kappa * ref).tolist())
        assert weighted.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
    absolute, _ = tfpo_objective(logp, log_v, inputs, args, ref_logp=None)
    assert weighted.item() == pytest.approx(absolute.item(), rel=1e-10, abs=1e-12)


def test_subtb_lambda_one_is_all_pairs_and_padding_is_inert():
    logp, rewards, log_v, mask = random_batch([5, 2], 5, seed=1)
    log_q = prefix_log_q(rewards, mask)
    a = subtb_loss(logp, log_q, log_v, mask, weighting="all")
    assert subtb_loss(logp, log_q, log_v, mask, weighting="lambda", subtb_lambda=1.0).item() == pytest.approx(a.item())
    # extra padding columns change nothing
    pad = lambda t, v: torch.cat([t, torch.full((t.shape[0], 3), v, dtype=t.dtype)], 1)  # noqa: E731
    wide_mask = pad(mask, False)
    b = subtb_loss(pad(logp, 4.0), prefix_log_q(pad(rewards, 9.0), wide_mask), pad(log_v, 3.0), wide_mask)
    assert b.item() == pytest.approx(a.item())
    with pytest.raises(ValueError, match="right-padded"):
        subtb_loss(logp, log_q, log_v, torch.tensor([[True, False, True, False, False]] * 2))


def test_value_loss_equals_brute_force_and_keeps_the_divergence_pair():
    g = torch.Generator().manual_seed(3)
    B, Lc, Lr, gamma = 3, 6, 5, 0.1
    c_ids = torch.randint(0, 4, (B, Lc), generator=g)
    r_ids = torch.randint(0, 4, (B, Lr), generator=g)
    c_ids[:, :2] = r_ids[:, :2] = 9  # shared first two tokens
    c_ids[0, 2], r_ids[0, 2] = 1, 2  # row 0 diverges at token 3
    c_mask = torch.arange(Lc)[None] < torch.tensor([[6], [4], [3]])
    r_mask = torch.arange(Lr)[None] < torch.tensor([[5], [2], [3]])
    c_rew = torch.randn(B, Lc, generator=g).double()
    r_rew = torch.randn(B, Lr, generator=g).double()
    c_rew[0, 2], r_rew[0, 2] = -0.5, 0.5  # the divergence pair is not rewarded "right" but must count
    vc = torch.randn(B, Lc + 1, generator=g).double()
    vr = torch.randn(B, Lr + 1, generator=g).double()
    div = first_divergence(c_ids, r_ids, c_mask, r_mask)
    assert div[0].item() == 3
    fast = value_discrimination_loss(vc, vr, c_rew, r_rew, c_mask, r_mask, c_ids, r_ids, gamma=gamma)
    terms = []
    for b in range(B):
        nc, nr = int(c_mask[b].sum()), int(r_mask[b].sum())
        j = next((k + 1 for k in range(min(nc, nr)) if c_ids[b, k] != r_ids[b, k]), 0)
        for w in range(1, nc + 1):
            for lo in range(1, nr + 1):
                if (c_rew[b, w - 1] > 0 and r_rew[b, lo - 1] < 0) or (j and w == j and lo == j):
                    terms.append(max(0.0, gamma - (vc[b, w].item() - vr[b, lo].item())))
    assert fast.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


def test_genarm_loss_formula():
    c, r = torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0])
    want = -torch.nn.functional.logsigmoid(0.05 * (c - r)).mean()
    assert genarm_loss(c, r).item() == pytest.approx(want.item())


# ---------------------------------------------------------------- the trainer on tiny models

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared 2-core box run ~50x faster on one thread than on two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A tiny tokenizer and a saved tiny doctor base LM."""
    from llmdoctor_train.toy.models import build_tiny_lm, build_tokenizer, save_lm

    root = tmp_path_factory.mktemp("tfpo")
    tok = build_tokenizer()
    base = save_lm(build_tiny_lm(tok, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, seed=3), tok,
                   root / "base")
    return {"tok": tok, "base": base, "root": root}


def synthetic_records(n, seed=0, flip=False):
    """Pairs sharing a prompt and a first token; the chosen then says GOOD, the rejected BAD.

    Rewards as Stage 1 would give them: +R on GOOD in y+, -R on BAD in y-, 0 elsewhere.
    """
    g = torch.Generator().manual_seed(seed)
    recs = []
    for _ in range(n):
        prompt = torch.randint(10, 100, (int(torch.randint(2, 5, (1,), generator=g)),), generator=g).tolist()
        a, tail = torch.randint(10, 100, (2,), generator=g).tolist()
        sign = -1.0 if flip else 1.0
        recs.append({"prompt_ids": prompt, "chosen_ids": [a, GOOD, tail], "rejected_ids": [a, BAD, tail],
                     "chosen_rewards": [0.0, sign * R, 0.0], "rejected_rewards": [0.0, -sign * R, 0.0]})
    return recs


def make_trainer(toy, out, *, lora=False, steps=10, records=None, **cfg):
    from datasets import Dataset
    from peft import LoraConfig

    from llmdoctor_train.stage2.trainer import TFPOConfig, TFPOTrainer

    kw = dict(output_dir=str(out), max_steps=steps, per_device_train_batch_size=8, learning_rate=3e-3,
              warmup_steps=0, logging_steps=5, save_strategy="no", report_to=[], seed=0, use_cpu=True,
              dataloader_num_workers=0, disable_tqdm=True)
    kw.update(cfg)
    args = TFPOConfig(**kw)
    data = Dataset.from_list(records if records is not None else synthetic_records(64))
    peft = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear") if lora else None
    return TFPOTrainer(toy["base"], args=args, train_dataset=data, processing_class=toy["tok"], peft_config=peft)


def good_minus_bad(model, records):
    """Mean doctor log p(GOOD) and log p(BAD) at the divergence state of each record."""
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([r["prompt_ids"][-2:] + r["chosen_ids"][:1] for r in records])
        logp = model(input_ids=ids).logits[:, -1].float().log_softmax(-1)
    return logp[:, GOOD].mean().item(), logp[:, BAD].mean().item()


def test_gradients_reach_lm_lora_and_value_head(toy, tmp_path):
    for lora in (True, False):
        tr = make_trainer(toy, tmp_path / str(lora), lora=lora)
        batch = tr._prepare_inputs(tr.data_collator(synthetic_records(4)))
        tr.model.train()
        tr.compute_loss(tr.model, batch).backward()
        grads = {n: p.grad for n, p in tr.model.named_parameters() if p.requires_grad}
        head = [g for n, g in grads.items() if "llmdoctor_value_head" in n]
        lm = [g for n, g in grads.items() if "llmdoctor_value_head" not in n]
        assert head and all(g is not None and g.abs().sum() > 0 for g in head)
        assert lm and all(g is not None for g in lm) and sum(g.abs().sum() for g in lm) > 0
        if lora:
            assert all("lora_" in n for n, _ in grads.items() if "llmdoctor_value_head" not in n)
        opt = tr.create_optimizer()
        in_opt = {id(p) for group in opt.param_groups for p in group["params"]}
        assert all(id(p) in in_opt for p in tr.value_head.parameters())


@pytest.fixture(scope="module")
def direction_runs(toy, tmp_path_factory):
    """The same doctor trained on the same pairs with rewards favouring GOOD, zero, and flipped."""
    held_out = synthetic_records(32, seed=99)
    runs = {}
    for name, sign in (("favour", 1.0), ("zero", 0.0), ("flip", -1.0)):
        recs = synthetic_records(64)
        for r in recs:
            r["chosen_rewards"] = [sign * x for x in r["chosen_rewards"]]
            r["rejected_rewards"] = [sign * x for x in r["rejected_rewards"]]
        # full fine-tuning of a random tiny LM: at 3e-3 the reference-relative fit overshoots and oscillates
        tr = make_trainer(toy, tmp_path_factory.mktemp(name), steps=60, records=recs, learning_rate=1e-3)
        tr.train()
        runs[name] = (*good_minus_bad(tr.model, held_out), tr.state.log_history, tr.model)
    return runs


def response_logratio(model, reference, records):
    """Per held-out response token: ``log pi - log pi_ref`` (``reference``: a model, or None for the
    same LoRA model with its adapter disabled)."""
    def token_logp(run):
        out = []
        for r in records:
            for side in ("chosen_ids", "rejected_ids"):
                x = torch.tensor([r["prompt_ids"] + r[side]])
                n = len(r["prompt_ids"])
                out.append(run(input_ids=x).logits[0, n - 1:-1].float().log_softmax(-1).gather(1, x[0, n:, None]))
        return torch.cat(out)

    model.eval()
    with torch.no_grad():
        doctor = token_logp(model)
        if reference is None:
            with model.disable_adapter():
                ref = token_logp(model)
        else:
            ref = token_logp(reference.eval())
    return (doctor - ref).squeeze(-1)


def test_training_raises_favoured_and_lowers_disfavoured_tokens(direction_runs):
    (g, b, *_), (g0, b0, *_), (gf, bf, *_) = (direction_runs[k] for k in ("favour", "zero", "flip"))
    # against the same training without rewards, the rewarded token rises and the penalised one falls
    assert g > g0 + 0.25 and b < b0 - 0.25, (g, g0, b, b0)
    # the chosen-vs-rejected gap moves towards sum r+ - sum r- = +-1.52 nats; without rewards it stays put
    gap, gap0, gapf = g - b, g0 - b0, gf - bf
    assert gap > gap0 + 0.8 and gapf < gap0 - 0.8 and abs(gap0) < 0.4, (gap, gap0, gapf)


def test_training_logs_tfpo_metrics(direction_runs):
    logged = [h for h in direction_runs["favour"][2] if "subtb" in h]
    assert logged and {"value_loss", "flow_residual", "pairs_ranked_right", "logp_margin"} <= set(logged[-1])
    assert logged[-1]["pairs_ranked_right"] > 0.9 and logged[-1]["subtb"] < logged[0]["subtb"]
    # the doctor's log-ratio margin is logged next to Stage 1's target (2R per pair) and moves towards it
    assert {"logratio_margin", "stage1_target"} <= set(logged[-1])
    assert logged[-1]["stage1_target"] == pytest.approx(2 * R, rel=1e-5)
    assert abs(logged[-1]["logratio_margin"] - 2 * R) < 0.6, logged[-1]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_zero_rewards_keep_the_doctor_its_reference(toy, tmp_path, lora):
    """Reference target: with all rewards zero the doctor stays its reference (log-ratio ~ 0; only the
    value loss's divergence pair tilts it, by about gamma); the same run with rewards moves it. For
    LoRA the reference is the adapter disabled, for full fine-tuning a frozen copy (at a full-LM rate)."""
    from transformers import AutoModelForCausalLM

    held_out = synthetic_records(16, seed=99)
    reference = None if lora else AutoModelForCausalLM.from_pretrained(toy["base"])
    lr = 3e-3 if lora else 5e-5
    ratios = {}
    for name, sign in (("zero", 0.0), ("favour", 1.0)):
        recs = synthetic_records(64)
        for r in recs:
            r["chosen_rewards"] = [sign * x for x in r["chosen_rewards"]]
            r["rejected_rewards"] = [sign * x for x in r["rejected_rewards"]]
        tr = make_trainer(toy, tmp_path / name, lora=lora, steps=40, records=recs, learning_rate=lr)
        tr.train()
        ratios[name] = response_logratio(tr.model, reference, held_out)
    zero = ratios["zero"].abs()
    assert zero.mean() < 0.15 and zero.max() < 0.5, zero
    margin = {k: v.view(-1, 2, 3).sum(-1) @ torch.tensor([1.0, -1.0]) for k, v in ratios.items()}  # y+ vs y-
    assert margin["zero"].mean().abs() < 0.3 and margin["favour"].mean() > 0.75, margin


def test_absolute_target_moves_the_doctor_without_rewards(toy, tmp_path):
    """The paper's target (reference_weight 0), for contrast: zero rewards still raise the likelihood of
    every training token."""
    recs = synthetic_records(64)
    for r in recs:
        r["chosen_rewards"], r["rejected_rewards"] = [0.0] * 3, [0.0] * 3
    tr = make_trainer(toy, tmp_path, lora=True, steps=30, records=recs, reference_weight=0.0)
    tr.train()
    assert response_logratio(tr.model, None, synthetic_records(16, seed=99)).mean() > 0.5


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_save_model_is_a_loadable_doctor(toy, tmp_path, lora):
    from llmdoctor_vllm.checkpoint import load_doctor

    tr = make_trainer(toy, tmp_path / "run", lora=lora, steps=3, trained_for="helpfulness")
    tr.train()
    out = tmp_path / "doctor"
    tr.save_model(str(out))
    doc = load_doctor(out, patient_tokenizer=toy["tok"])
    assert doc.manifest.kind == ("lora" if lora else "full")
    assert doc.manifest.trained_for == "helpfulness" and doc.manifest.extra["loss_type"] == "tfpo"
    assert doc.manifest.extra["reference_weight"] == 1.0 and doc.manifest.extra["value_loss_weight"] == 0.1
    for name, p in tr.value_head.state_dict().items():
        torch.testing.assert_close(doc.value_head.state_dict()[name], p)
    ids = torch.tensor([[11, 12, 13, GOOD]])
    tr.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(doc.model(input_ids=ids).logits, tr.model(input_ids=ids).logits)
    if lora:
        assert doc.manifest.base_model == str(toy["base"])
    else:
        assert doc.manifest.reference == str(toy["base"]) and doc.reference_model is not None
        assert not any("value_head" in k for k in doc.model.state_dict())


def test_frozen_reference_is_built_in_init_and_only_when_used(toy, tmp_path):
    """A full doctor's pi_ref is its starting weights, loaded and prepared before training, frozen; a
    LoRA doctor's is its adapter disabled, and the paper's target (reference_weight 0) needs none."""
    full = make_trainer(toy, tmp_path / "full", steps=1)
    ref = full.ref_model
    assert ref is not None and not ref.training and not any(p.requires_grad for p in ref.parameters())
    start = {n: p.detach().clone() for n, p in ref.named_parameters()}
    full.train()
    assert all(torch.equal(p, start[n]) for n, p in ref.named_parameters())  # it never trains
    assert make_trainer(toy, tmp_path / "lora", lora=True).ref_model is None
    assert make_trainer(toy, tmp_path / "paper", reference_weight=0.0).ref_model is None
    # as in TRL, the reference may also be given as a model: it is used as it is, and its path recorded
    from transformers import AutoModelForCausalLM

    from llmdoctor_train.stage2.trainer import TFPOTrainer

    given = AutoModelForCausalLM.from_pretrained(toy["base"])
    tr = TFPOTrainer(toy["base"], args=full.args, train_dataset=full.train_dataset, processing_class=toy["tok"],
                     ref_model=given)
    assert tr.ref_model is given and not given.training and tr.reference_path == str(toy["base"])


def test_prepare_dataset_keeps_the_reward_fields_of_the_chosen_dimension(toy, tmp_path):
    from datasets import Dataset

    from llmdoctor_train.stage2.trainer import TFPOTrainer

    recs = synthetic_records(4)
    for r in recs:
        r.update(chosen_rewards_safe=[9.0] * 3, rejected_rewards_safe=[-9.0] * 3, chosen_S=[0.5] * 3)
    tr = make_trainer(toy, tmp_path, records=recs, dimension="safe")
    assert sorted(tr.train_dataset.column_names) == sorted(
        ["prompt_ids", "chosen_ids", "rejected_ids", "chosen_rewards", "rejected_rewards"])
    assert tr.train_dataset[0]["chosen_rewards"] == [9.0] * 3
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['chosen_rewards_honest'"):
        TFPOTrainer._prepare_dataset(Dataset.from_list(recs), tr.args.__class__(
            output_dir=str(tmp_path), dimension="honest", use_cpu=True, report_to="none"), "train")


@pytest.fixture(scope="module")
def resumed_run(toy, tmp_path_factory):
    """A 4-step LoRA run saving every 2 steps, and its final parameters."""
    out = tmp_path_factory.mktemp("resume")
    tr = make_trainer(toy, out, lora=True, steps=4, save_strategy="steps", save_steps=2)
    tr.train()
    final = {n: p.detach().clone() for n, p in tr.model.named_parameters() if p.requires_grad}
    return out, final


def test_resume_from_checkpoint_continues_exactly(toy, tmp_path, resumed_run):
    out, final = resumed_run
    from llmdoctor_vllm.checkpoint import load_doctor

    load_doctor(out / "checkpoint-2", patient_tokenizer=toy["tok"])  # a Trainer checkpoint is a doctor
    tr = make_trainer(toy, tmp_path, lora=True, steps=4, save_strategy="no")
    tr.train(resume_from_checkpoint=str(out / "checkpoint-2"))
    assert tr.state.global_step == 4
    for n, p in tr.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.detach(), final[n], rtol=1e-4, atol=1e-5, msg=n)


@pytest.mark.parametrize("damage", ["value_head.safetensors", "adapter_model.safetensors", "trainer_state.json",
                                    "llmdoctor.json", "optimizer.pt", "rng_state.pth"])
def test_corrupt_checkpoint_gives_a_clear_error(toy, tmp_path, resumed_run, damage):
    from llmdoctor_train.stage2.trainer import ResumeCheckpointError

    ckpt = tmp_path / "checkpoint-2"
    shutil.copytree(resumed_run[0] / "checkpoint-2", ckpt)
    data = (ckpt / damage).read_bytes()
    (ckpt / damage).write_bytes(data[: len(data) // 2])
    tr = make_trainer(toy, tmp_path / "again", lora=True, steps=4)
    with pytest.raises(ResumeCheckpointError, match="cannot resume from checkpoint") as err:
        tr.train(resume_from_checkpoint=str(ckpt))
    assert str(ckpt) in str(err.value)
    named = {"optimizer.pt": "optimizer", "rng_state.pth": "random-number state"}.get(damage, damage)
    assert named in str(err.value)


def test_genarm_run_trains_the_margin_and_saves(toy, tmp_path):
    from llmdoctor_vllm.checkpoint import load_doctor

    tr = make_trainer(toy, tmp_path / "g", lora=True, steps=15, loss_type="genarm", genarm_beta=1.0)
    head_before = {k: v.clone() for k, v in tr.value_head.state_dict().items()}
    tr.train()
    logged = [h for h in tr.state.log_history if "genarm_loss" in h]
    assert logged[-1]["logp_margin"] > logged[0]["logp_margin"]
    for k, v in tr.value_head.state_dict().items():
        torch.testing.assert_close(v, head_before[k])  # GenARM does not touch the head
    tr.save_model(str(tmp_path / "doc"))
    assert load_doctor(tmp_path / "doc", patient_tokenizer=toy["tok"]).manifest.extra["loss_type"] == "genarm"


def test_cli_trains_from_a_saved_rewards_dataset(toy, tmp_path, capsys):
    from datasets import Dataset, DatasetDict

    from llmdoctor_vllm.checkpoint import load_doctor
    from llmdoctor_train.cli import main

    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0 and "--rewards" in capsys.readouterr().out
    recs = synthetic_records(16)
    for r in recs:  # Stage 1 also writes per-dimension columns and diagnostics
        r.update(chosen_rewards_harmless=r["chosen_rewards"], rejected_rewards_harmless=r["rejected_rewards"],
                 chosen_S=[0.5] * len(r["chosen_ids"]), row_index=0)
    DatasetDict(train=Dataset.from_list(recs), test=Dataset.from_list(recs[:4])).save_to_disk(str(tmp_path / "rw"))
    main(["train", "--rewards", str(tmp_path / "rw"), "--model", toy["base"], "--output", str(tmp_path / "out"),
          "--max_steps", "2", "--per_device_train_batch_size", "4", "--lora_r", "4", "--subtb_weighting",
          "lambda", "--dimension", "harmless", "--save_steps", "2", "--warmup_steps", "0", "--reference_weight", "0"])
    doc = load_doctor(tmp_path / "out", patient_tokenizer=toy["tok"])
    assert doc.is_lora and doc.manifest.extra["subtb_weighting"] == "lambda"
    assert doc.manifest.extra["reference_weight"] == 0.0
    assert doc.manifest.trained_for == "harmless"
    assert (tmp_path / "out" / "checkpoints" / "checkpoint-2").is_dir()
    assert "eval_subtb" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="lacks column"):
        main(["train", "--rewards", str(tmp_path / "rw"), "--model", toy["base"], "--output", str(tmp_path / "o2"),
              "--dimension", "honest"])


def test_cli_model_flags_are_trls_model_config(toy, tmp_path):
    """LoRA is on by default; --use_peft false trains all weights; what the plugin cannot serve is refused."""
    from llmdoctor_vllm.checkpoint import load_doctor
    from llmdoctor_train.cli import main

    rewards = _rewards_dir(tmp_path / "rw")
    main(["train", "--rewards", rewards, "--model", toy["base"], "--output", str(tmp_path / "full"), "--use_peft",
          "false", "--max_steps", "1", "--save_strategy", "no", "--use_cpu", "--report_to", "none"])
    assert load_doctor(tmp_path / "full", patient_tokenizer=toy["tok"]).manifest.kind == "full"
    for flags, message in ((["--lora_r", "0"], "lora_r must be positive"), (["--use_dora"], "use_dora")):
        with pytest.raises(SystemExit, match=message):
            main(["train", "--rewards", rewards, "--model", toy["base"], "--output", str(tmp_path / "x"), *flags])


def test_response_logprobs_equal_a_full_log_softmax(toy, tmp_path):
    """TRL's selective_log_softmax (no [2B, L, V] float copy) gives what log_softmax + gather gave."""
    tr = make_trainer(toy, tmp_path)
    batch = tr._prepare_inputs(tr.data_collator(synthetic_records(6)))
    tr.model.eval()
    with torch.no_grad():
        logp, _ = tr._response_terms(tr.model, batch, need_values=False)
        logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    mask = batch["response_mask"]
    for i in range(logp.shape[0]):
        start, n = int(batch["response_start"][i]), int(mask[i].sum())
        want = logits[i, start - 1:start - 1 + n].log_softmax(-1).gather(-1, batch["response_ids"][i, :n, None])[:, 0]
        torch.testing.assert_close(logp[i, :n], want)


def test_long_warmup_is_warned_and_metrics_are_reduced_over_ranks(toy, tmp_path, caplog):
    tr = make_trainer(toy, tmp_path, steps=3, warmup_steps=100, logging_steps=1)
    reduced = []
    real = tr.accelerator.reduce
    tr.accelerator.reduce = lambda t, reduction="mean": reduced.append(reduction) or real(t, reduction)
    with caplog.at_level("WARNING"):
        tr.train()
    assert "warm-up of 100 steps for a run of 3" in caplog.text
    assert reduced.count("mean") >= 3 and "subtb" in tr.state.log_history[0]
    assert make_trainer(toy, tmp_path / "r", steps=10, warmup_steps=0.2).args.get_warmup_steps(10) == 2


def _rewards_dir(path, tokenizer=None):
    """A small rewards dataset folder; with ``tokenizer``, a summary.json recording its fingerprint as Stage 1 does."""
    import json

    from datasets import Dataset

    from llmdoctor_vllm.checkpoint import tokenizer_fingerprint

    Dataset.from_list(synthetic_records(8)).save_to_disk(str(path))
    if tokenizer is not None:
        (path / "summary.json").write_text(json.dumps({"tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
                                                       "tokenizer_size": len(tokenizer)}))
    return str(path)


def test_cli_reads_a_trl_style_config_file_and_any_training_flag(toy, tmp_path):
    from transformers import AutoTokenizer

    from llmdoctor_vllm.checkpoint import load_doctor
    from llmdoctor_train.cli import main

    rewards = _rewards_dir(tmp_path / "rw", AutoTokenizer.from_pretrained(toy["base"]))
    (tmp_path / "tfpo.yaml").write_text(
        f"rewards: {rewards}\nmodel_name_or_path: {toy['base']}\noutput: {tmp_path / 'out'}\nlora_r: 4\n"
        "max_steps: 5\nper_device_train_batch_size: 4\nlr_scheduler_type: constant\nsave_strategy: 'no'\n"
        "loss_type: genarm\nenv:\n  TOKENIZERS_PARALLELISM: 'false'\n")
    main(["train", "--config", str(tmp_path / "tfpo.yaml"), "--max_steps", "2", "--use-cpu"])
    doc = load_doctor(tmp_path / "out", patient_tokenizer=toy["tok"])
    assert doc.manifest.extra["loss_type"] == "genarm" and doc.manifest.extra["global_step"] == 2
    args = torch.load(tmp_path / "out" / "training_args.bin", weights_only=False)
    assert str(args.lr_scheduler_type.value) == "constant" and args.learning_rate == 5e-4
    card = (tmp_path / "out" / "README.md").read_text()
    assert "TRL" in card and "llmdoctor_vllm:GuidanceProcessor" in card and "genarm" in card


def test_cli_refuses_a_foreign_tokenizer_or_architecture_before_training(toy, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmdoctor_train.cli import main
    from llmdoctor_train.toy.models import build_tokenizer, save_lm

    other = build_tokenizer(vocab_size=300)
    rewards = _rewards_dir(tmp_path / "rw", other)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match="tokenizer .* is not the patient's"):
        main(["train", "--rewards", rewards, "--model", toy["base"], "--output", str(out), "--max-steps", "1"])
    gpt2 = save_lm(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=1, vocab_size=len(toy["tok"]))),
                   toy["tok"], tmp_path / "gpt2")
    with pytest.raises(SystemExit, match="unsupported doctor architecture GPT2LMHeadModel"):
        main(["train", "--rewards", _rewards_dir(tmp_path / "rw2"), "--model", gpt2, "--output", str(out)])
    assert not out.exists()  # refused before anything was trained or written


def test_reference_weight_outside_zero_one_is_refused(tmp_path):
    from llmdoctor_train.stage2.config import TFPOConfig

    with pytest.raises(ValueError, match="reference_weight must be in"):
        TFPOConfig(output_dir=str(tmp_path), reference_weight=1.5, use_cpu=True, report_to="none")
