"""Constrained decoding: a grammar becomes a mask over the vocabulary at every sampling step.

llguidance (a Rust library) compiles the grammar (a JSON Schema, "any JSON object", or a Lark
grammar in llguidance's dialect) against the tokenizer and keeps one matcher per sequence.
Each step the runner advances the matchers by the tokens sampled since their last step, fills
a bitmask on the host (one bit per token, all sequences in parallel), copies it to the device
and sets the disallowed logits to -inf after the forward pass, so the forward (or its CUDA
graph) does not change and, with asynchronous scheduling, the host fills the mask while the
device runs the step's forward pass.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from longctx.errors import LongctxError
from longctx.tokenizer import Tokenizer

if TYPE_CHECKING:
    import llguidance

# Whitespace between JSON tokens: flexible (models write `{"a": 1}` and pretty-printed JSON)
# but bounded, so that a weak model cannot fill max_tokens with blanks inside an object.
JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,40}"
CHECKED_GRAMMARS_KEPT = 256


class StructuredOutputError(LongctxError, ValueError):
    """A grammar or JSON Schema the grammar engine cannot enforce."""


def _llg():
    """llguidance, imported when structured output is first asked for: everything else runs
    without it (the GPU images this project benchmarks on do not ship it)."""
    try:
        import llguidance
    except ImportError:
        raise StructuredOutputError(
            "structured output needs the llguidance package: pip install llguidance"
        ) from None
    return llguidance


@dataclass(frozen=True)
class StructuredOutput:
    """What the generated text must be: exactly one of a JSON Schema (json_schema), any JSON
    object (json_object=True), or a Lark grammar in llguidance's dialect (lark; `%json {...}`
    embeds a schema, `<name>` matches a special token). compact: JSON without whitespace
    between tokens (`{"a":1}`) instead of the bounded whitespace models write by habit."""

    json_schema: Mapping[str, Any] | None = None
    json_object: bool = False
    lark: str | None = None
    compact: bool = False

    def __post_init__(self) -> None:
        chosen = (self.json_schema is not None) + self.json_object + (self.lark is not None)
        if chosen != 1:
            raise StructuredOutputError(
                "StructuredOutput takes exactly one of json_schema, json_object or lark"
            )
        if self.json_schema is not None and not isinstance(self.json_schema, Mapping):
            raise StructuredOutputError("json_schema must be a JSON object (a dict)")

    def grammar(self) -> str:
        """The llguidance grammar (a JSON string)."""
        if self.lark is not None:
            return _llg().LLMatcher.grammar_from_lark(self.lark)
        schema = {"type": "object"} if self.json_object else dict(self.json_schema)
        llg = _llg()  # outside the try: a missing package is no invalid schema
        try:
            return llg.LLMatcher.grammar_from_json_schema(
                schema, defaults=json_options(self.compact)
            )
        except ValueError as e:
            raise StructuredOutputError(f"invalid JSON schema: {e}") from None


def json_options(compact: bool) -> dict[str, Any]:
    """llguidance's JSON compiler options."""
    if compact:
        return {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
    return {"whitespace_pattern": JSON_WHITESPACE}


def json_schema_lark(schema: Mapping[str, Any]) -> str:
    """A schema embedded in a Lark grammar (as `%json` takes it), with our whitespace rule."""
    options = json_options(compact=False)
    return "%json " + json.dumps({**schema, "x-guidance": options}, ensure_ascii=False)


class GrammarCompiler:
    """Checks grammars and makes matchers for one tokenizer. Thread-safe: the server checks
    requests on worker threads, the engine thread makes the matchers."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._ll: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._checked: OrderedDict[str, str] = OrderedDict()  # grammar -> error ("" if fine)

    def _ll_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._ll is None:  # about a second for a 150K vocabulary: built on first use
                self._ll = _llg().LLTokenizer(
                    self._tokenizer.backend.to_str(),
                    n_vocab=self._vocab_size,
                    eos_token=list(self._tokenizer.eos_token_ids),
                )
            return self._ll

    def check(self, spec: StructuredOutput) -> str:
        """The grammar of spec; raises StructuredOutputError naming what cannot be enforced."""
        grammar = spec.grammar()
        with self._lock:
            error = self._checked.get(grammar)
        if error is None:
            failed, messages = _llg().LLMatcher.validate_grammar_with_warnings(
                grammar, self._ll_tokenizer()
            )
            error = messages[0] if failed else ""
            with self._lock:
                self._checked[grammar] = error
                while len(self._checked) > CHECKED_GRAMMARS_KEPT:
                    self._checked.popitem(last=False)
        if error:
            raise StructuredOutputError(f"the grammar engine cannot enforce this: {error}")
        return grammar

    def token_literal(self, text: str) -> str:
        """How a Lark grammar matches text: as its special token if the tokenizer has one
        (llguidance does not match special tokens by their text), else as a string."""
        token_id = self._tokenizer.token_to_id(text)
        if token_id is not None and self._ll_tokenizer().is_special_token(token_id):
            return f"<[{token_id}]>"
        return json.dumps(text)

    def matcher(self, spec: StructuredOutput) -> GrammarMatcher:
        grammar = self.check(spec)
        return GrammarMatcher(_llg().LLMatcher(self._ll_tokenizer(), grammar, log_level=0))


class GrammarMatcher:
    """One sequence's position in its grammar. A token the grammar refuses (possible only if
    something bypassed the mask) puts the matcher in an error state whose mask allows only
    the end-of-sequence tokens."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher
        self.num_consumed = 0

    def advance(self, output_ids: Sequence[int]) -> None:
        """Consume the output tokens this matcher has not seen yet."""
        new = list(output_ids[self.num_consumed :])
        if new:
            self.matcher.consume_tokens(new)
        self.num_consumed = len(output_ids)

    @property
    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


@dataclass
class MaskTimes:
    """Host seconds spent on grammar masks since start (what a benchmark reads to see whether
    the mask hides behind the forward pass): waiting for the previous step's tokens, advancing
    the matchers over them, filling the bitmask; and the steps masked."""

    wait_s: float = 0.0
    advance_s: float = 0.0
    fill_s: float = 0.0
    steps: int = 0


class TokenMasks:
    """Fills the host bitmask of a batch of matchers (in parallel) and applies it on the device."""

    def __init__(self, vocab_size: int, device: torch.device) -> None:
        self.vocab_size = vocab_size
        self.device = device
        self._executor: llguidance.LLExecutor | None = None
        self._refused_bits: torch.Tensor | None = None
        self.times = MaskTimes()

    def fill(self, matchers: Sequence[GrammarMatcher]) -> torch.Tensor:
        """[len(matchers), ceil(V / 32)] int32 on the host, bit j of word w allowing token
        32 w + j."""
        start = time.perf_counter()
        if self._executor is None:
            self._executor = _llg().LLExecutor()
        words = -(-self.vocab_size // 32)
        pin = self.device.type == "cuda"
        bitmask = torch.empty((len(matchers), words), dtype=torch.int32, pin_memory=pin)
        rows = [(m.matcher, r) for r, m in enumerate(matchers)]
        self._executor.unsafe_compute_mask_ptr(rows, bitmask.data_ptr(), words * 4, len(rows))
        self.times.fill_s += time.perf_counter() - start
        self.times.steps += 1
        return bitmask

    def apply(self, logits: torch.Tensor, rows: list[int], bitmask: torch.Tensor) -> None:
        """Set the disallowed logits of the given rows of logits [R, V] to -inf, in place."""
        if self._refused_bits is None:
            self._refused_bits = refused_bits(logits.device)
        mask = bitmask.to(logits.device, non_blocking=True)
        if len(rows) == logits.shape[0]:
            apply_token_bitmask_(logits, mask, self._refused_bits)
            return
        index = torch.tensor(rows, device=logits.device)
        part = logits.index_select(0, index)
        apply_token_bitmask_(part, mask, self._refused_bits)
        logits.index_copy_(0, index, part)


def refused_bits(device: torch.device) -> torch.Tensor:
    """[256, 8] bool: whether bit j of each byte value is clear (the bitmask is read a byte
    at a time through this table)."""
    values = torch.arange(256, device=device)[:, None]
    return (values >> torch.arange(8, device=device)) & 1 == 0


def apply_token_bitmask_(
    logits: torch.Tensor, bitmask: torch.Tensor, table: torch.Tensor | None = None
) -> None:
    """logits [R, V]; bitmask [R, ceil(V / 32)] int32 on the same device, bit j of word w
    allowing token 32 w + j. On a little-endian machine byte k of word w holds tokens
    32 w + 8 k ... 32 w + 8 k + 7, so a table of each byte's 8 bits unpacks it."""
    table = refused_bits(logits.device) if table is None else table
    as_bytes = bitmask.view(torch.uint8).long()  # [R, 4 W]
    refused = table[as_bytes].flatten(1)[:, : logits.shape[1]]  # [R, 32 W] -> [R, V]
    logits.masked_fill_(refused, float("-inf"))
