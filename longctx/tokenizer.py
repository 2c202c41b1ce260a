"""Text <-> token ids, chat templates and streaming detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` built either from a Hugging Face directory
(tokenizer.json) or from the vocabulary a GGUF file carries in its metadata. The chat template
is rendered with Jinja2 the way transformers does, so prompts match token for token.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from longctx.errors import ConfigError, ModelLoadError

# The split regex of Qwen2's tokenizer.json (transformers' Qwen2Tokenizer.PRETOKENIZE_REGEX).
# Unlike GPT-4's, digits are split one by one (\p{N}, not \p{N}{1,3}).
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's tokenizer.json split regex (llama.cpp pre-tokenizer "llama-bpe").
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# GGUF token types (llama.cpp `llama_token_type`).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# Control tokens that end a turn although the file may only name one of them `eos`. llama.cpp
# treats these as end-of-generation by their text; Qwen's generation_config.json lists both
# <|im_end|> and <|endoftext|>.
_END_OF_GENERATION_TEXTS = (
    "<|im_end|>",
    "<|endoftext|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
)


@dataclass(frozen=True)
class _PreTokenizerSpec:
    split_regex: str | None  # None: GPT-2's own regex inside ByteLevel
    nfc: bool  # Qwen2's tokenizer.json NFC-normalizes the input
    ignore_merges: bool  # Llama 3's BPE looks whole words up in the vocabulary first


def _pre_tokenizer_spec(pre: str, source: str) -> _PreTokenizerSpec:
    """The pre-tokenizer llama.cpp's `tokenizer.ggml.pre` names, for the ones we support."""
    if pre in ("qwen2", "deepseek-r1-qwen"):
        return _PreTokenizerSpec(_QWEN2_SPLIT, nfc=True, ignore_merges=False)
    if pre in ("llama-bpe", "llama3", "llama-v3", "smaug-bpe"):
        return _PreTokenizerSpec(_LLAMA3_SPLIT, nfc=False, ignore_merges=True)
    if pre in ("gpt2", "default"):
        return _PreTokenizerSpec(None, nfc=False, ignore_merges=False)
    raise ModelLoadError(
        f"{source}: GGUF pre-tokenizer {pre!r} is not supported (supported: qwen2, llama-bpe, gpt2)"
    )


class Tokenizer:
    """A byte-level BPE tokenizer plus the special ids and chat template a model needs."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        eos_token_ids: Sequence[int] = (),
        bos_token_id: int | None = None,
        chat_template: str | None = None,
    ) -> None:
        self._backend = backend
        self._eos_token_ids = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self._bos_token_id = bos_token_id
        self._chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None

    # ---- basic properties -------------------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._backend

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def chat_template(self) -> str | None:
        return self._chat_template

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    # ---- encode / decode --------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text (<|im_start|>) stay whole."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def detokenizer(self, skip_special_tokens: bool = True) -> IncrementalDetokenizer:
        return IncrementalDetokenizer(self, skip_special_tokens=skip_special_tokens)

    # ---- chat template ------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, str]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render `messages` into a prompt string, as transformers' apply_chat_template does."""
        template = self._template()
        try:
            return template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                **self._special_token_strings(),
            )
        except jinja2.TemplateError as e:
            raise ConfigError(f"chat template failed to render: {e}") from None
        except (TypeError, ValueError, LookupError, AttributeError) as e:
            # e.g. a message whose content is None where the template concatenates strings
            raise ConfigError(f"chat template failed on these messages: {e}") from None

    def _template(self) -> jinja2.Template:
        if self._chat_template is None:
            raise ConfigError(
                "this model has no chat template (no chat_template in tokenizer_config.json, "
                "chat_template.jinja or GGUF metadata); send a raw prompt instead"
            )
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self._chat_template)
        return self._compiled_template

    def _special_token_strings(self) -> dict[str, str]:
        """bos_token / eos_token as strings: some templates print them (<|begin_of_text|>)."""
        strings = {}
        if self._bos_token_id is not None:
            strings["bos_token"] = self._backend.id_to_token(self._bos_token_id) or ""
        if self._eos_token_ids:
            strings["eos_token"] = self._backend.id_to_token(self._eos_token_ids[0]) or ""
        return strings

    # ---- constructors -----------------------------------------------------------------------

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json, chat_template.jinja, generation_config.json."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the Rust library raises a bare Exception on bad JSON
            raise ModelLoadError(f"{tokenizer_file}: cannot read tokenizer: {e}") from None
        config = _read_json(directory / "tokenizer_config.json")
        generation = _read_json(directory / "generation_config.json")
        return cls(
            backend,
            eos_token_ids=_hf_eos_ids(backend, config, generation),
            bos_token_id=_token_id(backend, config.get("bos_token")),
            chat_template=_hf_chat_template(directory, config),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any], source: str = "GGUF") -> Tokenizer:
        """Rebuild the tokenizer a GGUF describes under its `tokenizer.ggml.*` keys.

        `metadata` maps GGUF keys to plain Python values (string arrays as lists of str).
        """
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(
                f"{source}: GGUF tokenizer model {model!r} is not supported "
                "(only byte-level BPE, tokenizer.ggml.model = 'gpt2')"
            )
        tokens = _required(metadata, "tokenizer.ggml.tokens", source)
        types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        _check_gguf_ids(metadata, len(tokens), len(types), source)
        spec = _pre_tokenizer_spec(str(metadata.get("tokenizer.ggml.pre", "gpt2")), source)
        merges = _required(metadata, "tokenizer.ggml.merges", source)
        try:
            backend = _byte_level_bpe(tokens, merges, spec)
        except Exception as e:  # the Rust side raises a bare Exception (e.g. merge out of vocab)
            raise ModelLoadError(f"{source}: invalid GGUF tokenizer: {e}") from None
        _add_gguf_added_tokens(backend, tokens, types)
        bos = metadata.get("tokenizer.ggml.bos_token_id")
        if metadata.get("tokenizer.ggml.add_bos_token") and bos is not None:
            backend.post_processor = _prepend_bos(tokens[bos], bos)
        return cls(
            backend,
            eos_token_ids=_gguf_eos_ids(metadata, tokens, types),
            bos_token_id=bos,
            chat_template=metadata.get("tokenizer.chat_template"),
        )


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces.

    A character may span several byte-level tokens; until its last byte arrives the partial
    decode ends in U+FFFD, so that text is held back. Decoding a short window of recent tokens and
    diffing against the window's previous decode (rather than decoding each token alone) also
    keeps tokenizers whose decoders strip a leading space from misplacing it.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window already turned into text
        self._read_offset = 0  # end of the part of the window already emitted
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    @property
    def token_ids(self) -> list[int]:
        return list(self._ids)

    def add(self, token_id: int) -> str:
        """Feed one token; returns the text it completes ('' while a character is incomplete)."""
        self._ids.append(token_id)
        prefix = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._ids))
        if len(window) <= len(prefix) or window.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._emit(window[len(prefix) :])

    def flush(self) -> str:
        """Emit whatever is held back (an incomplete character decodes as U+FFFD)."""
        prefix = self._decode(self._prefix_offset, self._read_offset)
        window = self._decode(self._prefix_offset, len(self._ids))
        self._prefix_offset = self._read_offset = len(self._ids)
        return self._emit(window[len(prefix) :]) if len(window) > len(prefix) else ""

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special)

    def _emit(self, piece: str) -> str:
        self._pieces.append(piece)
        return piece


# ---- chat template compilation ----------------------------------------------------------------


def _compile_chat_template(source: str) -> jinja2.Template:
    """Same environment as transformers: sandboxed, trimmed blocks, loop controls, JSON filter."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_template_error
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ConfigError(
            f"chat template is not valid Jinja2 (line {e.lineno}): {e.message}"
        ) from None


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson HTML-escapes <, > and &, which would change tool schemas in prompts.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise_template_error(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


# ---- Hugging Face directory helpers ------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from `path`, or {} when the (optional) file is absent."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path}: expected a JSON object")
    return data


def _hf_chat_template(directory: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja (transformers >= 4.50 saves it apart) or tokenizer_config.json."""
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": ...}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _token_text(value: Any) -> str | None:
    """tokenizer_config.json writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _token_id(backend: tokenizers.Tokenizer, value: Any) -> int | None:
    text = _token_text(value)
    return backend.token_to_id(text) if text is not None else None


def _hf_eos_ids(
    backend: tokenizers.Tokenizer, config: Mapping[str, Any], generation: Mapping[str, Any]
) -> list[int]:
    ids = []
    eos = _token_id(backend, config.get("eos_token"))
    if eos is not None:
        ids.append(eos)
    gen_eos = generation.get("eos_token_id")
    if isinstance(gen_eos, int):
        gen_eos = [gen_eos]
    ids.extend(int(i) for i in gen_eos or ())
    return ids


# ---- GGUF helpers -----------------------------------------------------------------------------


def _required(metadata: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in metadata:
        raise ModelLoadError(f"{source}: GGUF metadata lacks {key!r}")
    return metadata[key]


def _check_gguf_ids(metadata: Mapping[str, Any], n_tokens: int, n_types: int, source: str) -> None:
    if n_types != n_tokens:
        raise ModelLoadError(f"{source}: GGUF has {n_tokens} tokens but {n_types} token types")
    for key in ("bos", "eos", "eot", "eom"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < n_tokens:
            raise ModelLoadError(
                f"{source}: tokenizer.ggml.{key}_token_id {token_id} is outside the "
                f"vocabulary of {n_tokens}"
            )


def _byte_level_bpe(
    tokens: Sequence[str], merges: Sequence[str], spec: _PreTokenizerSpec
) -> tokenizers.Tokenizer:
    vocab = {token: i for i, token in enumerate(tokens)}
    # Byte-level tokens spell a space as 'Ġ', so the one real space separates the merge pair.
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(
        BPE(
            vocab=vocab,
            merges=pairs,
            fuse_unk=False,
            byte_fallback=False,
            ignore_merges=spec.ignore_merges,
        )
    )
    if spec.nfc:
        backend.normalizer = normalizers.NFC()
    if spec.split_regex is None:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(spec.split_regex), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_gguf_added_tokens(
    backend: tokenizers.Tokenizer, tokens: Sequence[str], types: Sequence[int]
) -> None:
    """Control tokens become special added tokens, user-defined ones (<tool_call>) plain added
    tokens: either way they match whole in the text instead of being cut into BPE pieces."""
    control = [t for t, k in zip(tokens, types, strict=True) if k == _GGUF_CONTROL]
    user = [t for t, k in zip(tokens, types, strict=True) if k == _GGUF_USER_DEFINED]
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _prepend_bos(bos_text: str, bos_id: int) -> processors.TemplateProcessing:
    return processors.TemplateProcessing(
        single=f"{bos_text} $A",
        pair=f"{bos_text} $A {bos_text} $B",
        special_tokens=[(bos_text, bos_id)],
    )


def _gguf_eos_ids(
    metadata: Mapping[str, Any], tokens: Sequence[str], types: Sequence[int]
) -> list[int]:
    ids = [
        metadata[key]
        for key in (
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.eot_token_id",
            "tokenizer.ggml.eom_token_id",
        )
        if metadata.get(key) is not None
    ]
    ids.extend(
        i
        for i, (t, k) in enumerate(zip(tokens, types, strict=True))
        if k == _GGUF_CONTROL and t in _END_OF_GENERATION_TEXTS
    )
    return ids
