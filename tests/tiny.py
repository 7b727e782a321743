"""Tiny real Hugging Face models built from a config, with a tokenizer trained here.

Shared by the tests (through ``conftest.py`` fixtures) and by any bench smoke test: no hub,
a few hundred parameters per layer, real ``from_pretrained`` loading from disk.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a reward model scores a response to a prompt",
    "good great excellent wonderful happy love nice",
    "bad awful terrible horrible sad hate poor",
    "what does this word mean? it means a small animal that lives in the forest",
    "user assistant system: hello, how are you today? I am fine, thank you.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) [ ] { } < > | ! ? . , ; :",
]

CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}"
    "{% endfor %}"
)


def _train_bpe(special: list[str], vocab_size: int = 320) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    return tok


def encoder_tokenizer() -> PreTrainedTokenizerFast:
    tok = _train_bpe(["[PAD]", "[UNK]", "[CLS]", "[SEP]"])
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=128,
        # as BERT's: a (prompt, response) pair is two segments the model tells apart
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def decoder_tokenizer(chat_template: bool = True) -> PreTrainedTokenizerFast:
    tok = _train_bpe(["<s>", "</s>", "<unk>"])
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=128,
    )
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def build_encoder_rm(directory: Path, seed: int = 0) -> Path:
    tokenizer = encoder_tokenizer()
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=1,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,  # scores of order 1, so a 1e-4 tolerance means something
    )
    model = BertForSequenceClassification(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _llama_config(tokenizer: PreTrainedTokenizerFast, **extra) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
        initializer_range=0.2,
        **extra,
    )


def build_decoder_rm(directory: Path, seed: int = 0, chat_template: bool = True) -> Path:
    """A Llama classifier whose tokenizer has no pad token (pad falls back to EOS)."""
    tokenizer = decoder_tokenizer(chat_template)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(_llama_config(tokenizer, num_labels=1))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_policy(directory: Path, seed: int = 0) -> Path:
    """A tiny causal LM (the policy) sharing the decoder tokenizer."""
    tokenizer = decoder_tokenizer(chat_template=True)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_llama_config(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
