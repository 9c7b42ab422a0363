"""``slipstream make-checkpoint``: random-weight Hugging Face-format Qwen3 checkpoints.

Used by tests and GPU benchmarks (nothing can be downloaded from a model hub here). The
folder holds config.json, model.safetensors, generation_config.json, and a byte-level BPE
tokenizer.json trained on generated text so that text input works too. Like
Qwen3-Embedding's, its post-processor appends ``<|endoftext|>`` to every input.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from slipstream.config import parse_dtype


@dataclass(frozen=True, slots=True)
class Preset:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    tie_word_embeddings: bool
    tokenizer_vocab: int


PRESETS: dict[str, Preset] = {
    "qwen3-tiny": Preset(64, 2, 4, 2, 16, 128, 1024, 2048, 1_000_000.0, True, 1024),
    # The real Qwen3-0.6B shape (Qwen3-Embedding-0.6B shares it).
    "qwen3-0.6b": Preset(1024, 28, 16, 8, 128, 3072, 151936, 40960, 1_000_000.0, True, 8192),
}

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
_WORDS = (
    "the a an of to in and or is was are be for on with as by at from that this it not but "
    "model token vector search query document embedding engine packed batch sequence layer "
    "attention kernel memory copy buffer fast slow quick brown fox jumps over lazy dog cat "
    "river mountain city house light dark green blue red small large early late open close "
    "run walk read write think learn build test measure compare number zero one two three "
    "four five six seven eight nine ten hundred thousand data time space world people work"
).split()


def _corpus(seed: int, lines: int = 4000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        n = rng.randint(3, 24)
        words = [rng.choice(_WORDS) for _ in range(n)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 99999)))
        s = " ".join(words)
        out.append(s[0].upper() + s[1:] + rng.choice([".", "?", "!", ","]))
    return out


def train_tokenizer(vocab_size: int, seed: int) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(seed), trainer=trainer)
    eos = tok.token_to_id("<|endoftext|>")
    tok.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>",
        pair="$A <|endoftext|> $B <|endoftext|>",
        special_tokens=[("<|endoftext|>", eos)],
    )
    return tok


def make_checkpoint(
    preset: str,
    out: str | Path,
    seed: int = 0,
    dtype: str = "bfloat16",
    layout: str = "causal-lm",
    tie_word_embeddings: bool | None = None,
    overrides: dict[str, Any] | None = None,
) -> Path:
    """Write a random Qwen3 checkpoint; ``layout`` is ``causal-lm`` (keys under ``model.``,
    Qwen3ForCausalLM) or ``model`` (no prefix, Qwen3Model, as Qwen3-Embedding ships)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    if layout not in ("causal-lm", "model"):
        raise ValueError(f"unknown layout {layout!r}; use causal-lm or model")
    p = PRESETS[preset]
    fields = {f: getattr(p, f) for f in p.__slots__}  # type: ignore[attr-defined]
    fields.update(overrides or {})
    p = Preset(**fields)
    tied = p.tie_word_embeddings if tie_word_embeddings is None else tie_word_embeddings
    if layout == "model":
        tied = True  # a bare trunk has no lm_head
    tdtype = parse_dtype(dtype)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)

    tok = train_tokenizer(min(p.tokenizer_vocab, p.vocab_size), seed)
    tok.save(str(out_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")

    gen = torch.Generator().manual_seed(seed)
    std = 0.02
    h, d, i = p.hidden_size, p.head_dim, p.intermediate_size
    prefix = "model." if layout == "causal-lm" else ""

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * std).to(tdtype)

    def norm_w(n: int) -> torch.Tensor:
        # Around 1 but not exactly, so a missing norm weight would show in comparisons.
        return (1.0 + 0.1 * torch.randn(n, generator=gen)).to(tdtype)

    tensors: dict[str, torch.Tensor] = {f"{prefix}embed_tokens.weight": rnd(p.vocab_size, h)}
    for layer in range(p.num_layers):
        b = f"{prefix}layers.{layer}."
        tensors[b + "input_layernorm.weight"] = norm_w(h)
        tensors[b + "post_attention_layernorm.weight"] = norm_w(h)
        tensors[b + "self_attn.q_proj.weight"] = rnd(p.num_heads * d, h)
        tensors[b + "self_attn.k_proj.weight"] = rnd(p.num_kv_heads * d, h)
        tensors[b + "self_attn.v_proj.weight"] = rnd(p.num_kv_heads * d, h)
        tensors[b + "self_attn.o_proj.weight"] = rnd(h, p.num_heads * d)
        tensors[b + "self_attn.q_norm.weight"] = norm_w(d)
        tensors[b + "self_attn.k_norm.weight"] = norm_w(d)
        tensors[b + "mlp.gate_proj.weight"] = rnd(i, h)
        tensors[b + "mlp.up_proj.weight"] = rnd(i, h)
        tensors[b + "mlp.down_proj.weight"] = rnd(h, i)
    tensors[f"{prefix}norm.weight"] = norm_w(h)
    if not tied:
        tensors["lm_head.weight"] = rnd(p.vocab_size, h)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    dtype_name = str(tdtype).removeprefix("torch.")
    config = {
        "architectures": ["Qwen3ForCausalLM" if layout == "causal-lm" else "Qwen3Model"],
        "model_type": "qwen3",
        "vocab_size": p.vocab_size,
        "hidden_size": h,
        "intermediate_size": i,
        "num_hidden_layers": p.num_layers,
        "num_attention_heads": p.num_heads,
        "num_key_value_heads": p.num_kv_heads,
        "head_dim": d,
        "hidden_act": "silu",
        "max_position_embeddings": p.max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_theta": p.rope_theta,
        "rope_parameters": {"rope_theta": p.rope_theta, "rope_type": "default"},
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": tied,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(
        json.dumps({"bos_token_id": eos, "eos_token_id": [eos], "do_sample": False}, indent=2)
        + "\n"
    )
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "padding_side": "left",
        "model_max_length": p.max_position_embeddings,
        "chat_template": (
            "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
        ),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    return out_dir
