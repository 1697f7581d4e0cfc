"""Models of the experiments: tiny presets built from configs, hub models, and the bridge.

A model argument is either a tiny preset, `tiny-<family>-<size>`, built from a transformers
config with random weights seeded by --seed (no download, CPU-fast); or `random:<id or path>`,
the architecture of a real model (its config.json: experiments/configs/ holds those of
h100x4.yaml) with random weights, for measuring memory and time without the weights; or
anything else, which goes to from_pretrained as a hub id or a local path (the real loading
code). Presets and random: models read text through the word tokenizer of common.py.

    family  bert (encoder), gpt2 (decoder), t5 (encoder-decoder)
    size    small  hidden 32, 2 layers, 2 heads
            medium hidden 64, 2 layers, 4 heads
            large  hidden 128, 4 layers, 4 heads   (the model-size ablation)

The bridge (Bridge, BridgeClassifier): the sender encodes the text; a learned projection
(linear map + cross-attention from K learned queries) turns its hidden states into K soft
tokens in the receiver's embedding space, K = ceil(max_len / compression); the receiver
reads only those soft tokens and a linear head classifies its last hidden state. Sender and
receiver are frozen by default (only the projection and head learn), as when bridging two
pretrained models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common import RANDOM, is_preset, is_random


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int
    heads: int


SIZES = {"small": Size(32, 2, 2), "medium": Size(64, 2, 4), "large": Size(128, 4, 4)}
FAMILIES = ("bert", "gpt2", "t5")
MAX_POSITIONS = 512


def parse_preset(name: str) -> tuple[str, Size]:
    parts = name.split("-")
    if len(parts) != 3 or parts[1] not in FAMILIES or parts[2] not in SIZES:
        raise SystemExit(
            f"unknown tiny preset {name!r}: expected tiny-<{'|'.join(FAMILIES)}>-<{'|'.join(SIZES)}>, "
            "or a hub id / local path"
        )
    return parts[1], SIZES[parts[2]]


def _config(family: str, s: Size, vocab_size: int, **extra: Any) -> Any:
    import transformers as tf

    if family == "bert":
        return tf.BertConfig(
            vocab_size=vocab_size, hidden_size=s.hidden, num_hidden_layers=s.layers,
            num_attention_heads=s.heads, intermediate_size=4 * s.hidden,
            max_position_embeddings=MAX_POSITIONS, **extra,
        )
    if family == "gpt2":
        # GPT-2's own bos/eos ids (50256) lie outside a word vocabulary.
        ids = {"bos_token_id": None, "eos_token_id": None} | extra
        return tf.GPT2Config(
            vocab_size=vocab_size, n_embd=s.hidden, n_layer=s.layers, n_head=s.heads,
            n_positions=MAX_POSITIONS, **ids,
        )
    return tf.T5Config(
        vocab_size=vocab_size, d_model=s.hidden, d_kv=s.hidden // s.heads, d_ff=4 * s.hidden,
        num_layers=s.layers, num_decoder_layers=s.layers, num_heads=s.heads, **extra,
    )


def _load(name: str, vocab_size: int, dtype: torch.dtype, preset: dict[str, str], auto: str, **config: Any) -> Any:
    """Build preset `name` with the class preset[family]; or a random:<config> model; or
    auto.from_pretrained(name). `config` goes into the built config, or to from_pretrained
    (num_labels, ...).
    """
    import transformers as tf

    if is_random(name):
        cfg = tf.AutoConfig.from_pretrained(name.removeprefix(RANDOM))
        for key, value in config.items():
            setattr(cfg, key, value)
        # Built where it will run: an 8B model's random init on the CPU takes minutes.
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            return getattr(tf, auto).from_config(cfg, dtype=dtype)
    if not is_preset(name):
        return getattr(tf, auto).from_pretrained(name, dtype=dtype, **config)
    family, size = parse_preset(name)
    if family not in preset:
        raise SystemExit(f"{name}: this script needs a {' or '.join(sorted(preset))} preset or a {auto} model")
    model = getattr(tf, preset[family])(_config(family, size, vocab_size, **config))
    return model.to(dtype)


def load_backbone(name: str, vocab_size: int, dtype: torch.dtype = torch.float32) -> Any:
    """A bare model returning hidden states."""
    return _load(name, vocab_size, dtype, {"bert": "BertModel", "gpt2": "GPT2Model", "t5": "T5EncoderModel"}, "AutoModel")


def load_classifier(name: str, vocab_size: int, num_labels: int, pad_id: int, dtype: torch.dtype = torch.float32) -> Any:
    """A sequence classifier, a fresh head over the model (the LoRA baseline)."""
    classes = {"bert": "BertForSequenceClassification", "gpt2": "GPT2ForSequenceClassification"}
    model = _load(name, vocab_size, dtype, classes, "AutoModelForSequenceClassification", num_labels=num_labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = pad_id  # decoder-only classifiers read the last non-pad token
    return model


def load_causal_lm(name: str, vocab_size: int, dtype: torch.dtype = torch.float32) -> Any:
    return _load(name, vocab_size, dtype, {"gpt2": "GPT2LMHeadModel"}, "AutoModelForCausalLM")


def load_seq2seq(name: str, vocab_size: int, pad_id: int, eos_id: int, dtype: torch.dtype = torch.float32) -> Any:
    if not is_preset(name):
        return _load(name, vocab_size, dtype, {}, "AutoModelForSeq2SeqLM")
    ids = {"pad_token_id": pad_id, "eos_token_id": eos_id, "decoder_start_token_id": pad_id}
    return _load(name, vocab_size, dtype, {"t5": "T5ForConditionalGeneration"}, "AutoModelForSeq2SeqLM", **ids)


def hidden_size(model: Any) -> int:
    """Of a transformers model (hidden_size, or d_model for T5)."""
    config = model.config
    return int(getattr(config, "hidden_size", None) or config.d_model)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1)


class Bridge(nn.Module):
    """Sender hidden states (B, L, d_in) -> K soft tokens (B, K, d_out) for the receiver."""

    def __init__(self, d_in: int, d_out: int, soft_tokens: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.queries = nn.Parameter(torch.randn(soft_tokens, d_out) / math.sqrt(d_out))
        self.attn = nn.MultiheadAttention(d_out, num_heads=math.gcd(d_out, 8), batch_first=True)
        self.norm = nn.LayerNorm(d_out)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kv = self.proj(hidden.float())
        q = self.queries.unsqueeze(0).expand(hidden.shape[0], -1, -1)
        attended, _ = self.attn(q, kv, kv, key_padding_mask=mask == 0, need_weights=False)
        return self.norm(attended + q)


class BridgeClassifier(nn.Module):
    def __init__(self, sender: Any, receiver: Any, num_labels: int, soft_tokens: int, train_models: bool):
        super().__init__()
        self.sender, self.receiver = sender, receiver
        self.soft_tokens = soft_tokens
        self.bridge = Bridge(hidden_size(sender), hidden_size(receiver), soft_tokens)
        self.head = nn.Linear(hidden_size(receiver), num_labels)
        self.train_models = train_models
        for model in (sender, receiver):
            model.requires_grad_(train_models)

    def train(self, mode: bool = True) -> BridgeClassifier:
        super().train(mode)
        if not self.train_models:  # frozen models keep dropout off, as pretrained ones would
            self.sender.eval()
            self.receiver.eval()
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_models and torch.is_grad_enabled()):
            sent = self.sender(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        soft = self.bridge(sent, attention_mask)
        receiver_dtype = next(self.receiver.parameters()).dtype
        # The receiver is frozen but gradients flow through it into the soft tokens.
        out = self.receiver(inputs_embeds=soft.to(receiver_dtype)).last_hidden_state
        return self.head(out[:, -1].float())  # a causal receiver's last position has read all K


def load_bridge(
    sender: str, receiver: str, vocab_size: int, dtype: torch.dtype, max_len: int, compression: float,
    num_labels: int, train_models: bool = False,
) -> BridgeClassifier:
    """The bridge between a sender and a receiver model, as bridge.py trains it and latency.py
    times it: ceil(max_len / compression) soft tokens."""
    return BridgeClassifier(
        load_backbone(sender, vocab_size, dtype),
        load_backbone(receiver, vocab_size, dtype),
        num_labels=num_labels,
        soft_tokens=soft_token_count(max_len, compression),
        train_models=train_models,
    )


def soft_token_count(max_len: int, compression: float) -> int:
    return max(1, math.ceil(max_len / compression))
