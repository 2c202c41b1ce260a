"""GGUF files (llama.cpp's format): metadata -> ModelConfig + Tokenizer, tensors -> HF names.

We parse the header ourselves instead of using `gguf.GGUFReader`: the reader builds a numpy view
per string of the vocabulary and merge tables (300K of them for Qwen2) and takes ~15 s to open
a 0.5B model; walking the header with `struct` takes well under a second. The `gguf` package
still provides the quantization constants and the reference dequantizers.

Layout of a GGUF (v2/v3, little-endian):

    magic "GGUF" | u32 version | u64 n_tensors | u64 n_kv
    n_kv x (string key, u32 value type, value)
    n_tensors x (string name, u32 n_dims, u64 dims[n_dims], u32 ggml type, u64 data offset)
    padding to `general.alignment` | tensor data (offsets relative to here)

ggml lists dims fastest-varying first, so a weight with dims (in, out) is a row-major
[out, in] array: already Hugging Face's layout.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from longctx.config import SUPPORTED_ARCHITECTURES, ModelConfig
from longctx.errors import ConfigError, ModelLoadError
from longctx.loading.checkpoint import GGUF_MAGIC, Checkpoint, check_tensor_names
from longctx.tokenizer import Tokenizer

_DEFAULT_ALIGNMENT = 32
_QK = 32  # values per Q8_0 / Q5_0 block
_BLOCKS_PER_SLICE = 16384
_MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUF metadata value types -> struct format (scalars) and numpy dtype (scalar arrays).
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_FLOAT32, _STRING, _ARRAY = 6, 8, 9

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (slowest first): ggml dims reversed
    ggml_type: GGMLQuantizationType
    offset: int  # absolute, from the start of the file
    nbytes: int


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @classmethod
    def read(cls, path: Path) -> GGUFFile:
        """Parse the header and tensor table; no tensor data is read."""
        try:
            if path.stat().st_size < len(GGUF_MAGIC):  # mmap refuses empty files
                raise ModelLoadError(f"{path}: not a GGUF file (empty or too short)")
            with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _HeaderParser(buf, path).parse()
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from None

    @property
    def architecture(self) -> str:
        return str(self.metadata.get("general.architecture", ""))


class _HeaderParser:
    """A cursor over the file bytes that turns overruns into one clear 'truncated' error."""

    def __init__(self, buf: mmap.mmap, path: Path) -> None:
        self._buf = buf
        self._path = path
        self._pos = 0

    def parse(self) -> GGUFFile:
        n_tensors, n_kv = self._preamble()
        self._check_count(n_kv, 12, "metadata entries")
        metadata = dict(self._key_value() for _ in range(n_kv))
        self._check_count(n_tensors, 24, "tensors")
        infos = [self._tensor_info() for _ in range(n_tensors)]
        alignment = self._alignment(metadata)
        data_start = -(-self._pos // alignment) * alignment
        tensors = {info[0]: self._place(data_start, *info) for info in infos}
        return GGUFFile(self._path, metadata, tensors)

    def _alignment(self, metadata: dict[str, Any]) -> int:
        alignment = metadata.get("general.alignment", _DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelLoadError(f"{self._path}: corrupt GGUF: general.alignment = {alignment!r}")
        return alignment

    def _preamble(self) -> tuple[int, int]:
        if self._take(len(GGUF_MAGIC)) != GGUF_MAGIC:
            raise ModelLoadError(f"{self._path}: not a GGUF file (bad magic bytes)")
        (version,) = self._unpack("<I")
        if version not in (2, 3):
            raise ModelLoadError(
                f"{self._path}: unsupported GGUF version {version} (supported: 2, 3; "
                "a big-endian file also shows up this way)"
            )
        n_tensors, n_kv = self._unpack("<QQ")
        return n_tensors, n_kv

    def _key_value(self) -> tuple[str, Any]:
        key = self._string()
        (value_type,) = self._unpack("<I")
        return key, self._value(value_type, key)

    def _value(self, value_type: int, key: str) -> Any:
        if value_type == _FLOAT32:
            # Shortest decimal that round-trips in float32: 1e-06, not 9.999999974752427e-07.
            return float(str(np.float32(self._unpack("<f")[0])))
        if value_type in _SCALAR_FORMATS:
            return self._unpack(_SCALAR_FORMATS[value_type])[0]
        if value_type == _STRING:
            return self._string()
        if value_type == _ARRAY:
            return self._array(key)
        raise ModelLoadError(f"{self._path}: corrupt GGUF: metadata {key!r} has type {value_type}")

    def _array(self, key: str) -> list[Any]:
        element_type, count = self._unpack("<IQ")
        if element_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[element_type]
            width = struct.calcsize(fmt)
            self._check_count(count, width, f"elements of {key!r}")
            return np.frombuffer(self._take(count * width), dtype=np.dtype(fmt)).tolist()
        self._check_count(count, 8, f"elements of {key!r}")
        return [self._value(element_type, key) for _ in range(count)]

    def _tensor_info(self) -> tuple[str, tuple[int, ...], int, int]:
        name = self._string()
        (n_dims,) = self._unpack("<I")
        if not 1 <= n_dims <= _MAX_DIMS:
            raise ModelLoadError(f"{self._path}: corrupt GGUF: tensor {name!r} has {n_dims} dims")
        dims = self._unpack(f"<{n_dims}Q")
        ggml_type, offset = self._unpack("<IQ")
        return name, tuple(reversed(dims)), ggml_type, offset

    def _place(
        self, data_start: int, name: str, shape: tuple[int, ...], type_id: int, rel: int
    ) -> GGUFTensor:
        """Resolve type and byte range; a tensor past the end of the file means truncation."""
        try:
            ggml_type = GGMLQuantizationType(type_id)
        except ValueError:
            raise ModelLoadError(
                f"{self._path}: tensor {name!r} has unknown ggml type {type_id}"
            ) from None
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if shape[-1] % block:
            raise ModelLoadError(
                f"{self._path}: corrupt GGUF: tensor {name!r} row of {shape[-1]} is not a "
                f"multiple of the {ggml_type.name} block ({block})"
            )
        nbytes = math.prod(shape) // block * block_bytes
        offset = data_start + rel
        if offset + nbytes > len(self._buf):
            raise ModelLoadError(
                f"{self._path}: truncated GGUF: tensor {name!r} ends at byte {offset + nbytes} "
                f"but the file has {len(self._buf)} bytes"
            )
        return GGUFTensor(name, shape, ggml_type, offset, nbytes)

    # -- primitives --

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._buf):
            raise ModelLoadError(
                f"{self._path}: truncated or corrupt GGUF (header runs past the end of the file "
                f"at byte {len(self._buf)})"
            )
        data = self._buf[self._pos : end]
        self._pos = end
        return data

    def _unpack(self, fmt: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self._take(struct.calcsize(fmt)))

    def _string(self) -> str:
        (length,) = self._unpack("<Q")
        raw = self._take(length)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ModelLoadError(f"{self._path}: corrupt GGUF (a string is not UTF-8)") from None

    def _check_count(self, count: int, min_bytes: int, what: str) -> None:
        """Reject counts the rest of the file could not hold, before looping over them."""
        if count * min_bytes > len(self._buf) - self._pos:
            raise ModelLoadError(
                f"{self._path}: truncated or corrupt GGUF ({count} {what} cannot fit the file)"
            )


# ---- GGUF -> Checkpoint ------------------------------------------------------------------------


def load_gguf(path: Path) -> Checkpoint:
    gguf = GGUFFile.read(path)
    _check_supported(gguf)
    tokenizer = _gguf_tokenizer(gguf)
    config = gguf_model_config(gguf, tokenizer)
    by_hf_name = {_hf_name(t.name, path): t for t in gguf.tensors.values()}
    needed = check_tensor_names(by_hf_name, config, str(path))
    tensors = [(name, t) for name, t in by_hf_name.items() if name in needed]
    return Checkpoint(
        config=config,
        tokenizer=tokenizer,
        source=str(path),
        weights=lambda: _stream_tensors(path, tensors, config),
    )


def _gguf_tokenizer(gguf: GGUFFile) -> Tokenizer | None:
    """None when the file carries no vocabulary (a weights-only GGUF)."""
    if "tokenizer.ggml.tokens" not in gguf.metadata:
        return None
    return Tokenizer.from_gguf_metadata(gguf.metadata, source=str(gguf.path))


def _check_supported(gguf: GGUFFile) -> None:
    """Architecture and RoPE variant, before anything is built from the file."""
    arch = gguf.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    scaling = gguf.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none":
        raise ModelLoadError(
            f"{gguf.path}: RoPE scaling {scaling!r} is not supported (only unscaled RoPE)"
        )


def gguf_model_config(gguf: GGUFFile, tokenizer: Tokenizer | None = None) -> ModelConfig:
    """ModelConfig from `{arch}.*` metadata; what the metadata lacks comes from the tensors."""
    _check_supported(gguf)
    arch = gguf.architecture
    meta = _ArchMetadata(gguf, arch)
    hidden = meta.int("embedding_length")
    heads = meta.int("attention.head_count")
    if heads <= 0:
        raise ConfigError(f"{gguf.path}: {arch}.attention.head_count must be positive")
    try:
        return ModelConfig(
            architecture=arch,
            vocab_size=_vocab_size(gguf),
            hidden_size=hidden,
            intermediate_size=meta.int("feed_forward_length"),
            num_layers=meta.int("block_count"),
            num_heads=heads,
            num_kv_heads=meta.int("attention.head_count_kv", heads),
            head_dim=meta.int("attention.key_length", hidden // heads),
            rms_norm_eps=meta.float("attention.layer_norm_rms_epsilon", 1e-6),
            rope_theta=meta.float("rope.freq_base", 10000.0),
            max_position_embeddings=meta.int("context_length"),
            # Decided by the tensors, not by the base model: some GGUFs of tied models
            # (this default one included) still store a separate output.weight.
            tie_word_embeddings="output.weight" not in gguf.tensors,
            attention_bias="blk.0.attn_q.bias" in gguf.tensors,
            bos_token_id=gguf.metadata.get("tokenizer.ggml.bos_token_id"),
            eos_token_ids=_eos_ids(gguf, tokenizer),
        )
    except ConfigError as e:
        raise ConfigError(f"{gguf.path}: {e}") from None


class _ArchMetadata:
    """Typed access to `{arch}.<key>` values, naming the file and key when one is missing."""

    def __init__(self, gguf: GGUFFile, arch: str) -> None:
        self._gguf = gguf
        self._arch = arch

    def int(self, key: str, default: int | None = None) -> int:
        value = self._get(key, default)
        if isinstance(value, list):  # per-layer values (e.g. head_count_kv); we need them equal
            if len(set(value)) != 1:
                raise ModelLoadError(f"{self._gguf.path}: per-layer {self._arch}.{key} differ")
            value = value[0]
        return self._convert(int, key, value)

    def float(self, key: str, default: float) -> float:
        return self._convert(float, key, self._get(key, default))

    def _convert(self, kind: type, key: str, value: Any) -> Any:
        if isinstance(value, (str, bytes, list)):  # int("12") would pass; a GGUF never does this
            value = None
        try:
            return kind(value)
        except (TypeError, ValueError):
            raise ModelLoadError(
                f"{self._gguf.path}: GGUF metadata '{self._arch}.{key}' is not a number"
            ) from None

    def _get(self, key: str, default: Any) -> Any:
        value = self._gguf.metadata.get(f"{self._arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"{self._gguf.path}: GGUF metadata lacks '{self._arch}.{key}'")
        return value


def _vocab_size(gguf: GGUFFile) -> int:
    """The embedding's row count: what the model needs, whatever the vocabulary list says."""
    embedding = gguf.tensors.get("token_embd.weight")
    if embedding is None:
        raise ModelLoadError(f"{gguf.path}: GGUF lacks tensor 'token_embd.weight'")
    return embedding.shape[0]


def _eos_ids(gguf: GGUFFile, tokenizer: Tokenizer | None) -> tuple[int, ...]:
    if tokenizer is not None:
        return tokenizer.eos_token_ids
    eos = gguf.metadata.get("tokenizer.ggml.eos_token_id")
    return () if eos is None else (int(eos),)


def _hf_name(gguf_name: str, path: Path) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        # e.g. rope_freqs.weight (Llama 3.1 rope scaling), which this engine does not implement
        raise ModelLoadError(f"{path}: GGUF tensor {gguf_name!r} is not supported")
    layer, part, kind = m.groups()
    return f"model.layers.{layer}.{_BLOCK_NAMES[part]}.{kind}"


# ---- tensor data --------------------------------------------------------------------------------


def _stream_tensors(
    path: Path, tensors: list[tuple[str, GGUFTensor]], config: ModelConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Dequantize one tensor at a time from a read-only memory map."""
    try:
        data = np.memmap(path, dtype=np.uint8, mode="r")
    except OSError as e:
        raise ModelLoadError(f"{path}: cannot read: {e.strerror}") from None
    for name, t in tensors:
        weight = dequantize_tensor(data[t.offset : t.offset + t.nbytes], t, path)
        yield name, _undo_rope_permutation(name, weight, config)


def dequantize_tensor(raw: np.ndarray, t: GGUFTensor, path: Path) -> torch.Tensor:
    """float32 for quantized types; F32/F16/BF16 stay as stored. Shape t.shape, a fresh copy."""
    kind = t.ggml_type
    if kind in _PLAIN_DTYPES:
        return torch.from_numpy(raw.copy()).view(_PLAIN_DTYPES[kind]).reshape(t.shape)
    if kind in _TORCH_DEQUANTIZERS:
        return _TORCH_DEQUANTIZERS[kind](torch.from_numpy(raw.copy())).reshape(t.shape)
    rows = raw.reshape(-1, t.nbytes // math.prod(t.shape[:-1]))
    try:
        return torch.from_numpy(gguf_dequantize(rows, kind)).reshape(t.shape)
    except NotImplementedError:
        raise ModelLoadError(
            f"{path}: tensor {t.name!r} uses {kind.name}, which cannot be dequantized"
        ) from None


def _dequantize_blocks(
    raw: torch.Tensor, block_bytes: int, block_fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Run `block_fn` over slices of blocks into one float32 output.

    Slices of 16K blocks keep the integer temporaries in cache; whole-tensor temporaries made
    the 136M-value embedding ten times slower.
    """
    blocks = raw.view(-1, block_bytes)
    out = torch.empty(blocks.shape[0], _QK, dtype=torch.float32)
    for start in range(0, blocks.shape[0], _BLOCKS_PER_SLICE):
        end = start + _BLOCKS_PER_SLICE
        out[start:end] = block_fn(blocks[start:end])
    return out


def _q8_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q8_0 block (34 bytes): f16 scale, 32 x int8. Same float32 math as gguf.quants."""
    scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    return blocks[:, 2:].contiguous().view(torch.int8).float() * scale  # [n, 32]


def _q5_0_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Q5_0 block (22 bytes): f16 scale, 4 bytes of 5th bits, 16 bytes of nibble pairs.

    Value j < 16 is the low nibble of byte j, value j + 16 its high nibble; bit j of the
    little-endian u32 is the 5th bit of value j. Values are (q - 16) * scale.
    """
    scale = blocks[:, :2].contiguous().view(torch.float16).float()  # [n, 1]
    shifts = torch.arange(8, dtype=torch.uint8)
    fifth = ((blocks[:, 2:6, None] >> shifts) & 1).reshape(-1, _QK) << 4  # [n, 32]
    qs = blocks[:, 6:]
    nibbles = torch.cat([qs & 0x0F, qs >> 4], dim=1)  # [n, 32]
    return ((nibbles | fifth).view(torch.int8) - 16).float() * scale


_PLAIN_DTYPES = {
    GGMLQuantizationType.F32: torch.float32,
    GGMLQuantizationType.F16: torch.float16,
    GGMLQuantizationType.BF16: torch.bfloat16,
}
# Torch versions of the block types that dominate Q4_K_M / Q8_0 files (the embedding and output
# matrices); gguf's numpy code is ten times slower on these. Tested equal to gguf.quants.
_TORCH_DEQUANTIZERS = {
    GGMLQuantizationType.Q8_0: partial(_dequantize_blocks, block_bytes=34, block_fn=_q8_0_blocks),
    GGMLQuantizationType.Q5_0: partial(_dequantize_blocks, block_bytes=22, block_fn=_q5_0_blocks),
}


def _undo_rope_permutation(name: str, w: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """llama.cpp's converter reorders Llama's q/k rows for its RoPE; put them back.

    Hugging Face rotates the two halves of each head (rows [h, pair, half]); the converter stored
    rows as [h, half, pair] so that GGML can rotate adjacent elements. Qwen2 files are not
    permuted (GGML uses the 'NEOX' rotation for them, which matches HF).
    """
    if config.architecture != "llama":
        return w
    if ".self_attn.q_proj." in name:
        return _unpermute(w, config.num_heads)
    if ".self_attn.k_proj." in name:
        return _unpermute(w, config.num_kv_heads)
    return w


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).transpose(1, 2).reshape(w.shape)
