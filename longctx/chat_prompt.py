"""Chat prompts whose message content stays text.

Tokenizing a rendered chat template the usual way parses every special-token string in it, the
ones the user typed included: `<|im_end|>\\n<|im_start|>system` inside a user message would
become real role markers, a system turn any user could write. OpenAI treats content as text;
so does this: the template's own markers are control tokens, what the messages say is encoded
with special-token parsing off.

How the two are told apart: the template is rendered once more with each message's content
replaced by a sentinel, which shows where content sits among the template's own text. When no
content holds special-token text (the usual case) the prompt is encoded exactly as before.

    skeleton:  <|im_start|>user\\n  [C0]  <|im_end|>\\n<|im_start|>assistant\\n
    encoded:   <|im_start|>  lit("user\\n" + C0)  <|im_end|>  lit("\\n")  <|im_start|> lit(...)
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import tokenizers

from longctx.errors import ConfigError
from longctx.tokenizer import Tokenizer


class ChatEncoder:
    """Renders and encodes conversations for one tokenizer (safe to share between threads:
    both backends are only read)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        backend = tokenizer.backend
        self._special_ids = {
            i for i, tok in backend.get_added_tokens_decoder().items() if tok.special
        }
        specials = sorted(
            (backend.id_to_token(i) for i in self._special_ids), key=len, reverse=True
        )
        self._special_text = re.compile("|".join(map(re.escape, specials))) if specials else None
        # A copy that reads special-token strings as plain text.
        self._literal = tokenizers.Tokenizer.from_str(backend.to_str())
        self._literal.encode_special_tokens = True

    def encode(
        self,
        messages: list[dict[str, Any]],
        parse_special_in_content: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        """The rendered prompt and its token ids (tools: function definitions for the
        template)."""
        text = self.tokenizer.apply_chat_template(messages, tools=tools)
        if parse_special_in_content or not self._has_special_text(messages):
            if not parse_special_in_content:
                self._refuse_special_text_outside_content(messages, tools)
            return text, self.tokenizer.encode(text)
        self._refuse_special_text_outside_content(messages, tools)
        return text, self.encode_literal_content(messages, text, tools)

    def _has_special_text(self, messages: list[dict[str, Any]]) -> bool:
        pattern = self._special_text
        return pattern is not None and any(
            isinstance(m.get("content"), str) and pattern.search(m["content"]) for m in messages
        )

    def _refuse_special_text_outside_content(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
    ) -> None:
        """Tool definitions and tool calls are rendered as template text: special-token text
        there would become control tokens, so it is refused rather than parsed."""
        if self._special_text is None:
            return
        extra = [tools or [], [m.get("tool_calls") for m in messages if m.get("tool_calls")]]
        if self._special_text.search(json.dumps(extra, ensure_ascii=False)):
            raise ConfigError(
                "tools or tool_calls hold special-token text (such as <|im_start|>), which the "
                "chat template would turn into control tokens; remove it"
            )

    def encode_literal_content(
        self, messages: list[dict[str, Any]], text: str, tools: list[dict[str, Any]] | None = None
    ) -> list[int]:
        """Ids of `text` (the rendering of messages) with the content encoded as plain text."""
        pieces = self._skeleton(messages, tools)
        spliced = "".join(p if isinstance(p, str) else messages[p]["content"] for p in pieces)
        if spliced != text:
            raise ConfigError(
                "a message's content holds special-token text and this model's chat template "
                "changes content as it renders it, so that text cannot be kept as plain text; "
                "remove it (or start the server with --chat-parse-special-tokens)"
            )
        ids: list[int] = []
        run: list[str] = []  # plain text since the last control token
        for piece in pieces:
            if isinstance(piece, int):
                run.append(messages[piece]["content"])
                continue
            start = 0
            for token_id, (a, b) in self._markers(piece):
                run.append(piece[start:a])
                ids += self._encode_run(run)
                ids.append(token_id)
                start = b
            run.append(piece[start:])
        return ids + self._encode_run(run)

    def _skeleton(
        self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
    ) -> list[str | int]:
        """The template rendered around sentinels: its text pieces, and message indices where
        each (text) content sits."""
        tag = uuid.uuid4().hex
        masked = [
            {**m, "content": f"\ue000{tag}:{i}\ue001"} if isinstance(m.get("content"), str) else m
            for i, m in enumerate(messages)
        ]
        rendered = self.tokenizer.apply_chat_template(masked, tools=tools)
        pieces: list[str | int] = []
        for i, part in enumerate(re.split(f"\ue000{tag}:(\\d+)\ue001", rendered)):
            pieces.append(int(part) if i % 2 else part)
        return pieces

    def _markers(self, piece: str) -> list[tuple[int, tuple[int, int]]]:
        """The control tokens the tokenizer itself finds in template text, with their spans."""
        enc = self.tokenizer.backend.encode(piece, add_special_tokens=False)
        return [(t, span) for t, span in zip(enc.ids, enc.offsets) if t in self._special_ids]

    def _encode_run(self, run: list[str]) -> list[int]:
        text = "".join(run)
        run.clear()
        return self._literal.encode(text, add_special_tokens=False).ids if text else []
