"""The project's one builder of local models for tests, the toy world and benchmarks: nothing is downloaded.

A byte-level BPE tokenizer is trained on a few KB of generated sentences, and Qwen2-shaped
causal LMs (tiny by default, any shape on request: :func:`lm_config`, :func:`build_tiny_lm`) are
random-initialised on it and saved with ``save_pretrained``, so every consumer goes through
the real loading code.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

# The text the tiny tokenizer of the random-init models is trained on. Not the toy task's
# vocabulary (llmdoctor_train.toy.world, which the toy patient trains its own tokenizer on):
# these models never learn words, and the plugin tests size their KV budgets (preemption,
# cache exhaustion) on how this tokenizer splits their prompts, so the text stays as it is.
_TOKENIZER_WORDS = (
    ["the cat", "a dog", "the doctor", "my friend", "the patient", "a small bird", "the teacher", "our team"],
    ["kindly", "quickly", "carefully", "clearly", "politely", "rarely", "badly", "warmly"],
    ["sees", "helps", "finds", "likes", "answers", "writes", "reads", "builds", "thanks", "calls"],
    ["the book", "a letter", "the garden", "a question", "the river", "an answer", "the house", "a song"],
)
_TOKENIZER_EXTRA = ["badly", "rarely", "rudely", "poorly", "never", "kindly", "clearly", "politely", "warmly",
                    "carefully", "thanks", "helps"]


def tokenizer_corpus(n_sentences: int = 600, seed: int = 0) -> list[str]:
    """"{Subject} {adverb} {verb} {object}." sentences: enough text for a BPE with a few hundred merges."""
    rng = random.Random(seed)
    out = []
    for _ in range(n_sentences):
        s = " ".join(rng.choice(words) for words in _TOKENIZER_WORDS) + "."
        out.append(s[0].upper() + s[1:])
    return out


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 320):
    """Trains a byte-level BPE on ``texts`` and wraps it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = texts or tokenizer_corpus()
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts + _TOKENIZER_EXTRA, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>"
    )


def lm_config(tokenizer=None, *, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 2,
              num_kv_heads: int = 1, intermediate_size: int | None = None, vocab_size: int | None = None,
              vocab_pad_to: int = 1, max_position_embeddings: int = 2048, tie_word_embeddings: bool = False,
              **overrides):
    """The ``Qwen2Config`` of every random-init model of the project (tests, the toy patient, benchmarks).

    The vocabulary is ``vocab_size`` or the tokenizer's, rounded up to ``vocab_pad_to`` (real
    checkpoints often pad their logits past the tokenizer); the special token ids are the
    tokenizer's; ``intermediate_size`` defaults to twice the hidden size."""
    from transformers import Qwen2Config

    vocab = vocab_size if vocab_size is not None else len(tokenizer)
    vocab = -(-vocab // vocab_pad_to) * vocab_pad_to
    special = {} if tokenizer is None else dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id)
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size or 2 * hidden_size,
                       num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                       head_dim=hidden_size // num_heads, max_position_embeddings=max_position_embeddings,
                       tie_word_embeddings=tie_word_embeddings, **special | overrides)


def build_tiny_lm(tokenizer=None, *, seed: int = 0, dtype: torch.dtype = torch.float32,
                  lm_head_std: float | None = 0.3, **config):
    """A random-init Qwen2 causal LM of :func:`lm_config` ``(tokenizer, **config)``, in eval mode.

    ``lm_head_std``: the output layer drawn with this standard deviation (larger logits than the
    default init, so guidance visibly matters; None keeps transformers' init). Tiny shapes need
    head_dim 64 for vLLM's CPU kernels (hidden 128 with 2 heads, 64 with 1)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(lm_config(tokenizer, **config))
    if lm_head_std is not None:
        with torch.no_grad():
            model.lm_head.weight.normal_(0.0, lm_head_std)
    return model.to(dtype).eval()


def save_lm(model, tokenizer, path: str | Path) -> str:
    """``save_pretrained`` of model and tokenizer into ``path``."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def build_tiny_doctor(tokenizer, path: str | Path, *, seed: int = 1, lora_base: str | None = None,
                      reference: str | None = None, trained_for: str = "toy") -> str:
    """Saves a doctor checkpoint with a fresh value head through the plugin's own writer.

    With ``lora_base`` (a saved LM folder), the doctor is a random, non-zero LoRA adapter on
    those weights, so that adapter-on and adapter-off (the delta rule's reference) differ.
    Otherwise it is a full random doctor; ``reference`` names its delta-rule reference.
    """
    from llmdoctor_vllm.checkpoint import save_doctor
    from llmdoctor_vllm.value_head import ValueHead

    torch.manual_seed(seed)
    if lora_base is not None:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        base = AutoModelForCausalLM.from_pretrained(lora_base)
        cfg = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"], init_lora_weights=False)
        model = get_peft_model(base, cfg)
        hidden = base.config.hidden_size
        save_doctor(path, model, tokenizer, ValueHead(hidden), trained_for=trained_for, base_model=str(Path(lora_base).resolve()))
    else:
        model = build_tiny_lm(tokenizer, hidden_size=64, num_layers=2, num_heads=1, num_kv_heads=1, seed=seed)
        save_doctor(path, model, tokenizer, ValueHead(model.config.hidden_size), trained_for=trained_for,
                    reference=reference)
    return str(path)


def build_tiny_pair(root: str | Path, *, n_doctors: int = 1, lora: bool = False) -> dict:
    """Builds a tiny patient and ``n_doctors`` tiny doctors under ``root``; returns their paths.

    The patient's logits are padded past the tokenizer (as real checkpoints often are), the
    doctors' are not. Full doctors name a reference (random weights of the same shape).
    """
    root = Path(root).resolve()
    tok = build_tokenizer()
    patient = save_lm(build_tiny_lm(tok, vocab_pad_to=128, num_layers=2), tok, root / "patient")
    doctors = {}
    for i in range(n_doctors):
        name = f"doctor{i}"
        if lora:
            base = save_lm(build_tiny_lm(tok, hidden_size=64, num_layers=2, num_heads=1, seed=10 + i), tok,
                           root / f"{name}_base")
            doctors[name] = build_tiny_doctor(tok, root / name, seed=20 + i, lora_base=base)
        else:
            ref = save_lm(build_tiny_lm(tok, hidden_size=64, num_layers=2, num_heads=1, seed=30 + i), tok,
                          root / f"{name}_ref")
            doctors[name] = build_tiny_doctor(tok, root / name, seed=20 + i, reference=ref)
    return {"patient": patient, "doctors": doctors, "tokenizer": tok}
