"""Tokenizer (``tokenizers`` library), prompts, truncation and input validation."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer

from slipstream.errors import InputError, ModelLoadError

Inputs = str | Sequence[str] | Sequence[int] | Sequence[Sequence[int]]


def normalize_inputs(inputs: Any) -> list[str | list[int]]:
    """One list of items, each a string or a list of token ids. Raises InputError."""
    if isinstance(inputs, str):
        return [inputs]
    if isinstance(inputs, (bytes, bytearray)):
        raise InputError("inputs must be str, not bytes", param="input")
    if not isinstance(inputs, Sequence) and not hasattr(inputs, "__iter__"):
        raise InputError(
            f"inputs must be a string, a list of strings or a list of token-id lists, "
            f"got {type(inputs).__name__}",
            param="input",
        )
    items = list(inputs)
    if not items:
        raise InputError("input list is empty: give at least one input", param="input")
    if all(_is_int(x) for x in items):
        return [[int(x) for x in items]]  # one sequence of token ids
    out: list[str | list[int]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Sequence) and not isinstance(item, (bytes, bytearray)):
            if not all(_is_int(t) for t in item):
                raise InputError(
                    f"input {i}: a token-id list must hold integers only", param="input"
                )
            out.append([int(t) for t in item])
        else:
            raise InputError(
                f"input {i}: expected a string or a list of token ids, got {type(item).__name__}",
                param="input",
            )
    return out


def _is_int(x: Any) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    # numpy integers
    return type(x).__module__ == "numpy" and hasattr(x, "dtype") and x.dtype.kind in "iu"


class Tokenizer:
    """Batched encoding with truncation that keeps post-processor special tokens."""

    def __init__(self, model_dir: Path, max_input_tokens: int) -> None:
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"tokenizer.json not found in {model_dir}")
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises plain Exception types
            raise ModelLoadError(f"cannot read {path}: {e}") from e
        tok.no_padding()
        self.max_input_tokens = max_input_tokens
        # The library's own truncation accounts for the special tokens its post-processor
        # adds (e.g. Qwen3-Embedding's trailing <|endoftext|>), so they are never cut off.
        tok.enable_truncation(max_length=max_input_tokens)
        self._tok = tok
        # A second instance without truncation measures over-long inputs for error messages
        # (toggling truncation on the shared one would race with other threads).
        self._tok_full = HFTokenizer.from_file(str(path))
        self._tok_full.no_padding()
        self._tok_full.no_truncation()

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def encode_batch(self, texts: list[str], truncate: bool) -> list[list[int]]:
        encs = self._tok.encode_batch(texts, add_special_tokens=True)
        out: list[list[int]] = []
        for i, enc in enumerate(encs):
            if not truncate and enc.overflowing:
                n = self.count_tokens(texts[i])
                raise InputError(
                    f"input {i} has {n} tokens, over max_input_tokens={self.max_input_tokens}; "
                    "shorten it or enable truncation",
                    param="input",
                )
            out.append(list(enc.ids))
        return out

    def count_tokens(self, text: str) -> int:
        return len(self._tok_full.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def token_strings(self, ids: list[int]) -> list[str]:
        return [self._tok.id_to_token(i) or "" for i in ids]


def resolve_prompt(
    prompt_name: str | None, prompt: str | None, prompts: dict[str, str]
) -> str | None:
    if prompt_name is not None and prompt is not None:
        raise InputError("give either prompt_name or prompt, not both", param="prompt_name")
    if prompt_name is not None:
        if prompt_name not in prompts:
            known = ", ".join(sorted(prompts)) or "none (the model defines no prompts)"
            raise InputError(
                f"unknown prompt_name {prompt_name!r}; this model's prompts: {known}",
                param="prompt_name",
            )
        return prompts[prompt_name]
    return prompt
