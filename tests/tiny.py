"""Tiny real Hugging Face models built from a config, with a tokenizer trained here.

Shared by the tests (through ``conftest.py`` fixtures) and by any bench smoke test: no hub,
a few hundred parameters per layer, real ``from_pretrained`` loading from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModel,
    AutoTokenizer,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
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


def _bert_config(tokenizer: PreTrainedTokenizerFast, dropout: float) -> BertConfig:
    return BertConfig(
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
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


def build_encoder_rm(directory: Path, seed: int = 0, dropout: float = 0.1) -> Path:
    """``dropout`` 0: training is a function of the data alone (no random masks), as a
    comparison of runs over different numbers of processes needs."""
    tokenizer = encoder_tokenizer()
    torch.manual_seed(seed)
    model = BertForSequenceClassification(_bert_config(tokenizer, dropout))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def build_sentence_encoder(directory: Path, seed: int = 0, dropout: float = 0.1,
                           pooling: str | None = "mean") -> Path:
    """A bare BERT encoder (pooler weights included, as all-MiniLM-L6-v2's checkpoint) laid out
    as sentence-transformers saves one: ``modules.json`` and ``1_Pooling/config.json`` saying
    it was trained with ``pooling`` (``mean`` or ``cls``; None: a plain encoder, no such files)."""
    tokenizer = encoder_tokenizer()
    torch.manual_seed(seed)
    config = _bert_config(tokenizer, dropout)
    config.num_labels = 2  # a bare encoder's config says what PretrainedConfig says
    model = BertModel(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    if pooling is None:
        return directory
    (directory / "1_Pooling").mkdir()
    (directory / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    (directory / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": config.hidden_size,
        "pooling_mode_cls_token": pooling == "cls",
        "pooling_mode_mean_tokens": pooling == "mean",
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    return directory


def build_mean_pooled_rm(directory: Path, seed: int = 0) -> Path:
    """A mean-pooled RM as generalrm saves one (its head "trained": a non-zero bias), built
    from a tiny sentence encoder."""
    from training.reward_model import RewardModel

    encoder = build_sentence_encoder(directory.parent / f"{directory.name}-encoder", seed)
    rm = RewardModel.from_pretrained(encoder, pooling="mean", device="cpu", dtype="float32",
                                     seed=seed)
    with torch.no_grad():
        rm.model.classifier.bias.fill_(0.3)
    rm.save_pretrained(directory)
    return directory


def mean_pooled_recipe(directory: Path, prompt: str, response: str) -> float:
    """The reward of a mean-pooled RM as Hugging Face alone computes it (the recipe of
    ``training.pooled_encoder``): AutoModel, attention-mask mean, the saved linear head."""
    from safetensors.torch import load_file

    tokenizer = AutoTokenizer.from_pretrained(directory)
    encoder = AutoModel.from_pretrained(directory).eval()
    enc = tokenizer(prompt, response, return_tensors="pt")
    with torch.inference_mode():
        hidden = encoder(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    head = load_file(str(directory / "2_Dense" / "model.safetensors"))
    return float(pooled @ head["linear.weight"].T + head["linear.bias"])


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
