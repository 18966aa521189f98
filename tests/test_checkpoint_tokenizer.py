"""save_doctor fingerprints the tokenizer as it reloads from the folder it wrote, which is how the
plugin sees the patient's: a tokenizer saved beside a Qwen2 config reloads with one more token."""

from __future__ import annotations


def _tokenizer_without_endoftext():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from llmdoctor_train.toy.models import tokenizer_corpus

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", bos_token="<s>")


def test_fingerprint_is_of_the_reloaded_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from llmdoctor_vllm.checkpoint import load_doctor, save_doctor, tokenizer_fingerprint
    from llmdoctor_vllm.value_head import ValueHead
    from llmdoctor_train.toy.models import build_tiny_lm, save_lm

    tok = _tokenizer_without_endoftext()
    model = build_tiny_lm(tok, vocab_pad_to=64)
    patient = save_lm(model, tok, tmp_path / "patient")
    patient_tok = AutoTokenizer.from_pretrained(patient)
    assert len(patient_tok) == len(tok) + 1  # Qwen2's tokenizer adds its unk, <|endoftext|>
    manifest = save_doctor(tmp_path / "doctor", model, tok, ValueHead(model.config.hidden_size))
    assert manifest.tokenizer_size == len(patient_tok)
    assert manifest.tokenizer_fingerprint == tokenizer_fingerprint(patient_tok)
    load_doctor(tmp_path / "doctor", patient_tokenizer=patient_tok)  # the plugin's check passes
