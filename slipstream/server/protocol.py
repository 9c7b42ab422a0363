"""Request and response models: the server's OpenAPI schema.

Request fields use strict types (no "3" -> 3 or true -> 1 coercion): a wrong type is a
400 that names the field. Unknown fields are ignored, as OpenAI-compatible servers do.
Responses are built as plain JSON in ``app`` (the models below document them).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

# A string, a list of strings, one list of token ids, or a list of token-id lists.
EmbeddingInput = StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]


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
