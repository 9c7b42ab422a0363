"""Chat templates: the model's Jinja template, rendered the way transformers renders it.

Where the template comes from, first found wins: ``--chat-template FILE`` (the server's
setting), ``chat_template.jinja`` in the model folder, ``chat_template.json``
(``{"chat_template": ...}``), then the ``chat_template`` key of ``tokenizer_config.json``
(a string, or a list of ``{"name", "template"}`` from which ``default`` is taken).

The environment matches transformers' ``apply_chat_template``: a sandboxed (immutable)
Jinja environment with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols``
extension, a ``tojson`` filter, and the ``raise_exception`` and ``strftime_now`` globals.
The template gets ``messages`` (dicts with ``role`` and ``content`` strings, and ``name``
when given), ``add_generation_prompt=True``, ``tools=None``, ``documents=None`` and the
special tokens of ``tokenizer_config.json`` (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from slipstream.errors import InputError

logger = logging.getLogger("slipstream.server")

_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(Exception):
    """The chat template cannot be read or does not compile."""


@dataclass(frozen=True, slots=True)
class ChatTemplate:
    source: str  # where it came from (for logs and error messages)
    text: str
    template: Any  # jinja2.Template
    special_tokens: dict[str, str]

    @classmethod
    def load(cls, model_dir: Path, override: str | None = None) -> ChatTemplate | None:
        """The model's template (or ``override``); None when there is none. Raises
        ChatTemplateError when one exists but cannot be read or compiled."""
        config = _read_json(model_dir / "tokenizer_config.json") or {}
        special = {k: s for k in _SPECIAL_TOKEN_KEYS if (s := _token_text(config.get(k)))}
        found = ("--chat-template", override) if override is not None else _find(model_dir, config)
        if found is None:
            return None
        source, text = found
        return cls(source, text, compile_template(text, source), special)

    def render(self, messages: list[dict[str, Any]]) -> str:
        """The prompt for ``messages``, ending with the assistant's turn. Raises InputError
        (param ``messages``) when the template rejects them."""
        try:
            return str(
                self.template.render(
                    messages=messages,
                    add_generation_prompt=True,
                    tools=None,
                    documents=None,
                    **self.special_tokens,
                )
            )
        except Exception as e:  # TemplateError, raise_exception(), or a type error inside
            raise InputError(
                f"the chat template rejected these messages: {type(e).__name__}: {e}",
                param="messages",
            ) from None


def compile_template(text: str, source: str = "chat template") -> Any:
    try:
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as e:  # pragma: no cover (jinja2 is in the server extra)
        raise ChatTemplateError(
            "chat templates need jinja2: pip install 'slipstream[server]'"
        ) from e

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(text)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"the chat template ({source}) does not compile: {e}") from e


def _find(model_dir: Path, config: dict[str, Any]) -> tuple[str, str] | None:
    jinja_file = model_dir / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return str(jinja_file), jinja_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ChatTemplateError(f"cannot read {jinja_file}: {e}") from e
    json_file = model_dir / "chat_template.json"
    data = _read_json(json_file)
    if data is not None and isinstance(data.get("chat_template"), str):
        return str(json_file), data["chat_template"]
    value = config.get("chat_template")
    source = str(model_dir / "tokenizer_config.json")
    if isinstance(value, str) and value.strip():
        return source, value
    if isinstance(value, list):  # named templates: take "default"
        named: dict[Any, str] = {
            t.get("name"): t["template"]
            for t in value
            if isinstance(t, dict) and isinstance(t.get("template"), str)
        }
        if "default" in named:
            return f"{source} (default)", named["default"]
    return None


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ChatTemplateError(f"cannot read {path}: {e}") from e
    return data if isinstance(data, dict) else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return str(value["content"])  # an AddedToken saved as a dict
    return None
