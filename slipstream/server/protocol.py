"""Request and response models: the server's OpenAPI schema.

Request fields use strict types (no "3" -> 3 or true -> 1 coercion): a wrong type is a
400 that names the field. Unknown fields are ignored, as OpenAI-compatible servers do.
Responses are built as plain JSON in ``app`` (the models below document them).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
)

# A string, a list of strings, one list of token ids, or a list of token-id lists.
EmbeddingInput = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
# A JSON number (an integer is accepted where a float is expected; a boolean is not).
Number = StrictFloat | StrictInt


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class EmbeddingRequest(_Request):
    """``POST /v1/embeddings`` (the OpenAI contract)."""

    input: EmbeddingInput = Field(
        description="A string, a list of strings, a list of token ids or a list of "
        "token-id lists. Strings must not be empty."
    )
    model: StrictStr | None = Field(
        default=None, description="Must be the served model name when given."
    )
    encoding_format: Literal["float", "base64"] | None = Field(
        default="float",
        description="float: JSON numbers; base64: little-endian float32 bytes, base64-encoded.",
    )
    dimensions: StrictInt | None = Field(
        default=None, description="Keep the first N dimensions (Matryoshka), then normalise."
    )
    user: StrictStr | None = Field(default=None, description="Accepted and ignored.")


class EmbedRequest(_Request):
    """``POST /embed`` (text-embeddings-inference style)."""

    inputs: EmbeddingInput
    normalize: StrictBool = True
    truncate: StrictBool | None = Field(
        default=None, description="Truncate over-long inputs (default: the server's setting)."
    )
    dimensions: StrictInt | None = None
    prompt_name: StrictStr | None = Field(
        default=None, description="A prompt from the model's sentence-transformers config."
    )


class TokenizeRequest(_Request):
    """``POST /tokenize``: the token ids the server would embed (special tokens included)."""

    inputs: StrictStr | list[StrictStr]
    truncate: StrictBool | None = None
    prompt_name: StrictStr | None = None


# ---------------------------------------------------------------------- generation
class StreamOptions(_Request):
    include_usage: StrictBool | None = Field(
        default=False, description="Send a last chunk with `usage` (and `choices: []`)."
    )


class _GenerationRequest(_Request):
    """Fields shared by ``/v1/completions`` and ``/v1/chat/completions``."""

    model: StrictStr | None = Field(
        default=None, description="Must be the served model name when given."
    )
    max_tokens: StrictInt | None = Field(
        default=None,
        description="Most tokens to generate (>= 1). The prompt plus max_tokens must fit the "
        "model's context.",
    )
    temperature: Number | None = Field(
        default=None, description="Default 1.0; 0 is greedy. Must be >= 0."
    )
    top_p: Number | None = Field(default=None, description="Nucleus sampling, in (0, 1].")
    top_k: StrictInt | None = Field(
        default=None, description="Extension: keep the k most likely tokens (0: off). >= 0."
    )
    n: StrictInt | None = Field(default=None, description="Only 1 is supported.")
    stop: StrictStr | list[StrictStr] | None = Field(
        default=None, description="Stop strings: cut from the returned text."
    )
    seed: StrictInt | None = Field(
        default=None,
        description="Makes sampling reproducible (0 <= seed < 2**63), whatever the batching.",
    )
    stream: StrictBool | None = Field(
        default=False, description="Server-sent events, ending with `data: [DONE]`."
    )
    stream_options: StreamOptions | None = None
    user: StrictStr | None = Field(default=None, description="Accepted and ignored.")
    # extensions (vLLM-style)
    ignore_eos: StrictBool | None = Field(
        default=False, description="Extension: keep generating past the EOS token."
    )
    stop_token_ids: list[StrictInt] | None = Field(
        default=None, description="Extension: token ids that end generation."
    )
    return_token_ids: StrictBool | None = Field(
        default=False,
        description="Extension: add `prompt_token_ids` and `token_ids` to each choice "
        "(`token_ids` only, per chunk, when streaming).",
    )
    # accepted with their default values only (400 otherwise)
    logprobs: StrictBool | StrictInt | None = Field(
        default=None, description="Not supported (null or false only)."
    )
    presence_penalty: Number | None = Field(default=None, description="Not supported (0 only).")
    frequency_penalty: Number | None = Field(default=None, description="Not supported (0 only).")
    logit_bias: dict[str, Number] | None = Field(
        default=None, description="Not supported (empty only)."
    )


class CompletionRequest(_GenerationRequest):
    """``POST /v1/completions`` (the OpenAI contract)."""

    prompt: EmbeddingInput = Field(
        description="A string, a list of strings, a list of token ids or a list of token-id "
        "lists; several prompts give several choices (their `index`)."
    )
    echo: StrictBool | None = Field(default=False, description="Not supported (false only).")
    best_of: StrictInt | None = Field(default=None, description="Not supported (1 only).")
    suffix: StrictStr | None = Field(default=None, description="Not supported.")


class TextContentPart(_Request):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[TextContentPart] | None = Field(
        default=None, description="A string, or text parts (joined with newlines)."
    )
    name: StrictStr | None = None


class ChatCompletionRequest(_GenerationRequest):
    """``POST /v1/chat/completions`` (the OpenAI contract): the model's chat template turns
    ``messages`` into the prompt."""

    messages: list[ChatMessage] = Field(description="The conversation so far (not empty).")
    max_completion_tokens: StrictInt | None = Field(
        default=None,
        description="Same as max_tokens (give one of them). Default: the rest of the context.",
    )
    top_logprobs: StrictInt | None = Field(default=None, description="Not supported.")
    tools: list[Any] | None = Field(default=None, description="Not supported (empty only).")


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class Token(BaseModel):
    id: int
    text: str


class EmbeddingData(BaseModel):
    object: Literal["embedding"] = "embedding"
    embedding: list[float] | str
    index: int


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingData]
    model: str
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "slipstream"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class HealthResponse(BaseModel):
    status: str
