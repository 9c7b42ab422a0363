"""A generation request's state, its outputs, and incremental detokenization."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from slipstream.kv.radix import RadixNode
from slipstream.sampling import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # holds no pages (new, or preempted and to be recomputed)
    RUNNING = "running"  # admitted: holds pages, mid-prefill or decoding
    FINISHED = "finished"


FINISH_STOP = "stop"  # EOS, a stop token id or a stop string
FINISH_LENGTH = "length"  # max_new_tokens or the model's context length
FINISH_ABORT = "abort"


@dataclass(frozen=True, slots=True)
class GenerationOutput:
    """The final result of one request."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens (a terminating EOS / stop token included)
    text: str | None  # decoded generated text (None without a tokenizer); stop string cut
    finish_reason: str  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None  # the stop token id or stop string that matched
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (first admission)


@dataclass(frozen=True, slots=True)
class StepOutput:
    """What one ``GenerationEngine.step()`` produced for one request (for streaming)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str | None  # text delta (requests added with detokenize=True), else None
    finished: bool
    finish_reason: str | None = None
    output: GenerationOutput | None = None  # set when finished


class IncrementalDetokenizer:
    """Streams text deltas from growing token lists without re-decoding everything.

    It decodes a small window (from ``prefix_offset``) twice per token and emits the growth,
    holding back while the tail is an incomplete UTF-8 sequence (U+FFFD): byte-level BPE can
    split one character over several tokens.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""

    def push(self, ids: list[int]) -> str:
        prefix_text = self._tok.decode(ids[self.prefix_offset : self.read_offset], self._skip)
        new_text = self._tok.decode(ids[self.prefix_offset :], self._skip)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(ids)
            self.text += delta
            return delta
        return ""


@dataclass(eq=False)
class Request:
    """One generation request. Lengths are named, and their invariants checked by ``check``.

    * ``prompt_len``: tokens of the prompt; ``output_len``: tokens generated so far.
    * ``total_len = prompt_len + output_len``: every known token.
    * ``cached_len``: leading tokens whose K/V is in the pool (a prefix-cache hit or computed).
    * ``extend_len``: tokens scheduled in the current step (``cached_len ..< cached_len +
      extend_len``); 0 between steps.

    A request is decoding when ``cached_len == total_len - 1`` (only the last sampled token is
    not in the cache yet). After a preemption ``cached_len`` drops back to 0 and the prompt and
    the tokens generated so far are recomputed as one prefill.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: int  # admission order tie-breaker (FCFS)
    stop_ids: frozenset[int] = frozenset()
    detokenize: bool = False
    token_ids: list[int] = field(default_factory=list)  # prompt + output
    status: RequestStatus = RequestStatus.WAITING
    cached_len: int = 0
    extend_len: int = 0
    page_table: list[int] = field(default_factory=list)
    # Radix cache: the deepest node this request holds a lock on, and how many leading pages of
    # page_table belong to the tree (the rest are the request's own).
    prefix_node: RadixNode | None = None
    num_tree_pages: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at first admission (reported)
    num_preemptions: int = 0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    detok: IncrementalDetokenizer | None = None
    emitted_text_len: int = 0  # streamed characters (stop strings hold the tail back)
    admitted_once: bool = False

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def total_len(self) -> int:
        return len(self.token_ids)

    @property
    def output_len(self) -> int:
        return self.total_len - self.prompt_len

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def remaining_len(self) -> int:
        """Known tokens not in the cache yet (1 when decoding)."""
        return self.total_len - self.cached_len

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def check(self, page_size: int) -> None:
        assert self.prompt_len >= 1 and self.output_len >= 0
        assert 0 <= self.cached_len <= self.total_len
        assert 0 <= self.extend_len <= self.total_len - self.cached_len
        assert len(self.page_table) * page_size >= self.cached_len + self.extend_len
        assert 0 <= self.num_tree_pages <= len(self.page_table)
        assert self.num_tree_pages * page_size <= self.cached_len + self.extend_len
        if self.status is RequestStatus.WAITING:
            assert self.cached_len == 0 and not self.page_table and self.prefix_node is None
