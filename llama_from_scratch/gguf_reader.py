"""A GGUF reader written from scratch with `struct` and numpy.

GGUF is the single-file format of llama.cpp: a small header, a table of metadata (the model's
hyperparameters, its tokenizer, its chat template), a table describing each tensor, and then the
raw tensor data, often quantized to 4 or 8 bits per weight. Everything is little-endian:

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64
    kv_count x   (key: string, value_type: u32, value)
    tensor_count x (name: string, n_dims: u32, dims: n_dims x u64, ggml_type: u32, offset: u64)
    padding up to a multiple of `general.alignment` (32 when absent)
    data section: each tensor starts at data_start + offset (offset a multiple of the alignment)

A string is a u64 byte length followed by that many UTF-8 bytes; an array is a u32 element type,
a u64 count, then the elements. ggml lists dimensions fastest-varying first, so a PyTorch
`[out_features, in_features]` weight is stored with dims `[in_features, out_features]`: the
shapes this reader reports are reversed into PyTorch's order.

The reader treats the file as untrusted input. Every length read from it (string lengths, array
counts, dimension lists, tensor counts) is checked against the bytes that remain before anything
is allocated, so a corrupted or hostile file raises `GGUFError` naming the problem instead of
crashing, hanging or allocating gigabytes. As in llama.cpp, the tensors' data must follow one
another in table order (each at the previous one's padded end, the last one ending the file), so
a tensor table whose offsets, types or dimensions were changed is refused rather than read as
overlapping or shifted data. Tensor data is memory-mapped (`numpy.memmap`) and only
read when `GGUFFile.load_tensor` dequantizes it.

The `gguf` package (maintained with llama.cpp) is the reference these functions are tested
against; it is not used here.

The last section reads a llama GGUF in this package's terms: its metadata as a `LlamaConfig`
(`config_from_gguf`), llama.cpp's tensor names as Hugging Face's (`gguf_to_hf_name`), and its
tensors as a state dict with q/k rows in rotate-half order (`llama_state_dict`), from which
`Llama.from_gguf` builds the model (see `loading.py` for the four steps).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.rope import permute_qk_for_rotate_half, rope_inv_freq

__all__ = [
    "GGUFError",
    "GGMLType",
    "GGML_TYPES",
    "GGUF_VALUE_TYPES",
    "GGUFTensorInfo",
    "GGUFFile",
    "read_gguf",
    "dequantize",
    "SUPPORTED_DEQUANT_TYPES",
    "config_from_gguf",
    "gguf_to_hf_name",
    "llama_state_dict",
    "check_llama_keys",
]

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS: ggml tensors have at most four dimensions
MAX_ARRAY_NESTING = 8  # arrays of arrays are legal; a deeper nesting than this is not a real file


class GGUFError(ValueError):
    """A GGUF file is malformed, truncated, or uses something this reader does not support."""


class GGMLType(NamedTuple):
    """A ggml tensor type: `block_size` elements are stored in `type_size` bytes."""

    id: int
    name: str
    block_size: int
    type_size: int


_QK_K = 256  # the super-block size of the "K" quantizations
# Every ggml type id with its block layout (from ggml.h / ggml.c). The reader needs the sizes of
# all of them to check a file's tensor table, even for types it cannot dequantize.
GGML_TYPES: dict[int, GGMLType] = {
    t.id: t
    for t in [
        GGMLType(0, "F32", 1, 4),
        GGMLType(1, "F16", 1, 2),
        GGMLType(2, "Q4_0", 32, 2 + 16),
        GGMLType(3, "Q4_1", 32, 2 + 2 + 16),
        GGMLType(6, "Q5_0", 32, 2 + 4 + 16),
        GGMLType(7, "Q5_1", 32, 2 + 2 + 4 + 16),
        GGMLType(8, "Q8_0", 32, 2 + 32),
        GGMLType(9, "Q8_1", 32, 4 + 4 + 32),
        GGMLType(10, "Q2_K", _QK_K, 2 + 2 + _QK_K // 16 + _QK_K // 4),
        GGMLType(11, "Q3_K", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + 12),
        GGMLType(12, "Q4_K", _QK_K, 2 + 2 + _QK_K // 2 + 12),
        GGMLType(13, "Q5_K", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 8 + 12),
        GGMLType(14, "Q6_K", _QK_K, 2 + _QK_K // 2 + _QK_K // 4 + _QK_K // 16),
        GGMLType(15, "Q8_K", _QK_K, 4 + _QK_K + _QK_K // 8),
        GGMLType(16, "IQ2_XXS", _QK_K, 2 + _QK_K // 4),
        GGMLType(17, "IQ2_XS", _QK_K, 2 + _QK_K // 4 + _QK_K // 32),
        GGMLType(18, "IQ3_XXS", _QK_K, 2 + _QK_K // 4 + _QK_K // 8),
        GGMLType(19, "IQ1_S", _QK_K, 2 + _QK_K // 8 + _QK_K // 16),
        GGMLType(20, "IQ4_NL", 32, 2 + 16),
        GGMLType(21, "IQ3_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 8 + _QK_K // 32 + 4),
        GGMLType(22, "IQ2_S", _QK_K, 2 + _QK_K // 4 + _QK_K // 16),
        GGMLType(23, "IQ4_XS", _QK_K, 2 + 2 + _QK_K // 2 + _QK_K // 64),
        GGMLType(24, "I8", 1, 1),
        GGMLType(25, "I16", 1, 2),
        GGMLType(26, "I32", 1, 4),
        GGMLType(27, "I64", 1, 8),
        GGMLType(28, "F64", 1, 8),
        GGMLType(29, "IQ1_M", _QK_K, _QK_K // 8 + _QK_K // 16 + _QK_K // 32),
        GGMLType(30, "BF16", 1, 2),
        GGMLType(34, "TQ1_0", _QK_K, 2 + 4 * 13),
        GGMLType(35, "TQ2_0", _QK_K, 2 + 64),
        GGMLType(39, "MXFP4", 32, 1 + 16),
    ]
}
_GGML_TYPE_BY_NAME = {t.name: t for t in GGML_TYPES.values()}

# Metadata value types: id -> (name, struct format or None for string / array).
GGUF_VALUE_TYPES: dict[int, tuple[str, str | None]] = {
    0: ("UINT8", "<B"),
    1: ("INT8", "<b"),
    2: ("UINT16", "<H"),
    3: ("INT16", "<h"),
    4: ("UINT32", "<I"),
    5: ("INT32", "<i"),
    6: ("FLOAT32", "<f"),
    7: ("BOOL", "<B"),
    8: ("STRING", None),
    9: ("ARRAY", None),
    10: ("UINT64", "<Q"),
    11: ("INT64", "<q"),
    12: ("FLOAT64", "<d"),
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
# numpy dtypes of the fixed-size value types, for reading a whole numeric array at once
_NUMPY_VALUE_DTYPES = {
    0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4",
    6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8", 12: "<f8",
}  # fmt: skip


@dataclass(frozen=True)
class GGUFTensorInfo:
    """One entry of the tensor table.

    `shape` is in PyTorch order (ggml's dims reversed); `ggml_shape` is as stored in the file.
    `offset` is relative to the start of the data section, as stored; `file_offset` is absolute.
    `n_bytes` is the size of the (possibly quantized) data in the file.
    """

    name: str
    shape: tuple[int, ...]
    ggml_shape: tuple[int, ...]
    ggml_type: str
    ggml_type_id: int
    offset: int
    file_offset: int
    n_bytes: int

    @property
    def n_elements(self) -> int:
        """Number of values in the tensor (the product of its dimensions)."""
        n = 1
        for d in self.shape:
            n *= d
        return n


class _Cursor:
    """Reads little-endian values from a buffer, checking every read against its end."""

    def __init__(self, buf: memoryview, size: int) -> None:
        self.buf = buf
        self.size = size
        self.pos = 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        """Raise GGUFError unless `n` more bytes are available for `what`."""
        if n < 0 or n > self.remaining:
            raise GGUFError(
                f"truncated or corrupt GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                f"but only {self.remaining} remain (file size {self.size})"
            )

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return value

    def u32(self, what: str) -> int:
        return self.unpack("<I", what)

    def u64(self, what: str) -> int:
        return self.unpack("<Q", what)

    def string(self, what: str) -> str:
        length = self.u64(f"length of {what}")
        self.need(length, f"{what} (declared length {length})")
        raw = bytes(self.buf[self.pos : self.pos + length])
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(f"{what} at offset {self.pos - length} is not valid UTF-8: {e}") from None

    def numpy_array(self, dtype: str, count: int, what: str) -> np.ndarray:
        itemsize = np.dtype(dtype).itemsize
        self.need(count * itemsize, f"{what} ({count} elements of {itemsize} bytes)")
        arr = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += count * itemsize
        return arr


def _read_value(cur: _Cursor, value_type: int, key: str, depth: int = 0) -> Any:
    """Read one metadata value of the given type; arrays become Python lists."""
    if value_type not in GGUF_VALUE_TYPES:
        raise GGUFError(f"metadata key {key!r} has unknown value type {value_type}")
    if value_type == _STRING:
        return cur.string(f"string value of {key!r}")
    if value_type == _ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise GGUFError(f"metadata key {key!r}: arrays nested more than {MAX_ARRAY_NESTING} deep")
        item_type = cur.u32(f"array element type of {key!r}")
        if item_type not in GGUF_VALUE_TYPES:
            raise GGUFError(f"metadata key {key!r} is an array of unknown value type {item_type}")
        count = cur.u64(f"array length of {key!r}")
        if item_type in _NUMPY_VALUE_DTYPES:  # fixed-size elements: one vectorised read
            values = cur.numpy_array(_NUMPY_VALUE_DTYPES[item_type], count, f"array {key!r}")
            if item_type == _BOOL:
                return [bool(v) for v in values]
            return values.tolist()
        # Strings take at least 8 bytes (their length) and arrays at least 12: refuse counts that
        # could not possibly fit before building a list of that many elements.
        min_size = 8 if item_type == _STRING else 12
        if count > cur.remaining // min_size:
            raise GGUFError(
                f"metadata key {key!r}: array of {count} elements cannot fit in the "
                f"{cur.remaining} bytes left in the file"
            )
        return [_read_value(cur, item_type, key, depth + 1) for _ in range(count)]
    value = cur.unpack(GGUF_VALUE_TYPES[value_type][1], f"value of {key!r}")
    return bool(value) if value_type == _BOOL else value


def _ggml_type(type_id: int, tensor: str) -> GGMLType:
    if type_id not in GGML_TYPES:
        raise GGUFError(f"tensor {tensor!r} has unknown ggml type id {type_id}")
    return GGML_TYPES[type_id]


class GGUFFile:
    """A parsed GGUF file: header, metadata, tensor table, and memory-mapped tensor data.

    Build it with `read_gguf(path)`. Attributes: `path`, `version`, `metadata` (key -> value, in
    file order; arrays are lists), `value_types` (key -> the GGUF value type name, e.g. "UINT32"
    or "ARRAY[STRING]"), `tensors` (name -> GGUFTensorInfo, in file order), `alignment`,
    `data_offset` (absolute start of the data section), `file_size`.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"no GGUF file at {self.path!r}")
        self.file_size = os.path.getsize(self.path)
        if self.file_size < 24:
            raise GGUFError(
                f"{self.path!r} is {self.file_size} bytes: too short for a GGUF header (24 bytes)"
            )
        self._data: np.memmap | None = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self._parse(_Cursor(memoryview(self._data), self.file_size))
        except GGUFError:
            self.close()
            raise

    def _parse(self, cur: _Cursor) -> None:
        magic = bytes(cur.buf[0:4])
        cur.pos = 4
        if magic != GGUF_MAGIC:
            raise GGUFError(f"not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}")
        version = cur.u32("version")
        if version not in SUPPORTED_VERSIONS:
            if version & 0xFFFF == 0 and (version >> 24) in SUPPORTED_VERSIONS:
                raise GGUFError(f"big-endian GGUF files are not supported (version field {version:#x})")
            raise GGUFError(f"unsupported GGUF version {version} (this reader reads versions 2 and 3)")
        self.version: int = version
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata key/value count")
        # A key/value pair takes at least 13 bytes (key length, value type, a one-byte value) and
        # a tensor entry at least 24 (name length, n_dims, type, offset).
        if n_kv > cur.remaining // 13:
            raise GGUFError(f"metadata count {n_kv} cannot fit in a {self.file_size}-byte file")
        if n_tensors > cur.remaining // 24:
            raise GGUFError(f"tensor count {n_tensors} cannot fit in a {self.file_size}-byte file")

        self.metadata: dict[str, Any] = {}
        self.value_types: dict[str, str] = {}
        for i in range(n_kv):
            key = cur.string(f"key of metadata entry {i}")
            if key in self.metadata:
                raise GGUFError(f"duplicate metadata key {key!r}")
            value_type = cur.u32(f"value type of {key!r}")
            type_name = GGUF_VALUE_TYPES.get(value_type, ("?",))[0]
            if value_type == _ARRAY and cur.remaining >= 4:
                item = struct.unpack_from("<I", cur.buf, cur.pos)[0]
                type_name = f"ARRAY[{GGUF_VALUE_TYPES.get(item, ('?',))[0]}]"
            self.metadata[key] = _read_value(cur, value_type, key)
            self.value_types[key] = type_name

        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int)
            or isinstance(alignment, bool)
            or alignment <= 0
            or alignment & (alignment - 1)
        ):
            raise GGUFError(f"general.alignment must be a positive power of two, got {alignment!r}")
        self.alignment: int = alignment

        infos = []
        for i in range(n_tensors):
            name = cur.string(f"name of tensor {i}")
            n_dims = cur.u32(f"dimension count of tensor {name!r}")
            if n_dims > MAX_DIMS:
                raise GGUFError(f"tensor {name!r} has {n_dims} dimensions; ggml allows at most {MAX_DIMS}")
            dims = tuple(cur.u64(f"dimension {j} of tensor {name!r}") for j in range(n_dims))
            type_id = cur.u32(f"ggml type of tensor {name!r}")
            offset = cur.u64(f"data offset of tensor {name!r}")
            infos.append((name, dims, type_id, offset))

        # The data section starts at the next multiple of the alignment after the tensor table.
        # A file without tensor data may end before that padding (writers skip it, llama.cpp
        # accepts it): the data section is then empty, and any tensor with bytes is caught below.
        self.data_offset: int = -(-cur.pos // alignment) * alignment
        data_size = max(0, self.file_size - self.data_offset)

        self.tensors: dict[str, GGUFTensorInfo] = {}
        # llama.cpp's rule: tensors follow one another in table order, each starting at the
        # previous one's end rounded up to the alignment. A changed offset, type or dimension
        # breaks this chain, so the data of two tensors can never overlap or be misread.
        expected_offset, previous = 0, None
        for name, dims, type_id, offset in infos:
            if name in self.tensors:
                raise GGUFError(f"duplicate tensor name {name!r}")
            gtype = _ggml_type(type_id, name)
            n_elements = 1
            for d in dims:
                n_elements *= d
            if n_elements >= 2**63:
                raise GGUFError(f"tensor {name!r} has absurd dimensions {list(dims)}")
            if dims and dims[0] % gtype.block_size:
                raise GGUFError(
                    f"tensor {name!r}: first dimension {dims[0]} is not a multiple of the "
                    f"{gtype.name} block size {gtype.block_size}"
                )
            n_bytes = n_elements // gtype.block_size * gtype.type_size
            if offset % alignment:
                raise GGUFError(
                    f"tensor {name!r}: data offset {offset} is not a multiple of the alignment {alignment}"
                )
            if offset + n_bytes > data_size:
                raise GGUFError(
                    f"tensor {name!r}: its {n_bytes} bytes at data offset {offset} run past the end "
                    f"of the file (data section holds {data_size} bytes)"
                )
            if offset != expected_offset:
                after = f"the end of tensor {previous!r}" if previous else "the start of the data section"
                raise GGUFError(
                    f"tensor {name!r} has data offset {offset}, expected {expected_offset} ({after}, "
                    f"padded to {alignment}): its data would overlap another tensor or leave a gap"
                )
            expected_offset = offset + -(-n_bytes // alignment) * alignment
            previous = name
            self.tensors[name] = GGUFTensorInfo(
                name=name,
                shape=tuple(int(d) for d in reversed(dims)),
                ggml_shape=tuple(int(d) for d in dims),
                ggml_type=gtype.name,
                ggml_type_id=gtype.id,
                offset=offset,
                file_offset=self.data_offset + offset,
                n_bytes=n_bytes,
            )
        # Bytes beyond the last tensor's padding belong to no tensor: a tensor table that shrank
        # (a type or dimension changed on the last tensor) would leave them behind.
        if infos and data_size > expected_offset:
            raise GGUFError(
                f"{data_size - expected_offset} bytes after the end of the last tensor "
                f"{previous!r} belong to no tensor (data section {data_size} bytes, tensors "
                f"{expected_offset}): the tensor table does not describe this file's data"
            )

    # --- tensor data ---

    def raw_tensor(self, name: str) -> np.ndarray:
        """The tensor's bytes as stored in the file: a read-only uint8 view of the memory map."""
        info = self._info(name)
        if self._data is None:
            raise GGUFError(f"{self.path!r} has been closed")
        return self._data[info.file_offset : info.file_offset + info.n_bytes]

    def load_tensor(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantize tensor `name` into a new torch tensor of PyTorch shape `info.shape`.

        Values are computed in float32 (exactly as ggml does) and then cast to `dtype`.
        Raises GGUFError for a ggml type this reader cannot dequantize.
        """
        info = self._info(name)
        values = dequantize(self.raw_tensor(name), info.ggml_type, info.n_elements, tensor=name)
        return torch.from_numpy(values.reshape(info.shape)).to(dtype)

    def _info(self, name: str) -> GGUFTensorInfo:
        if name not in self.tensors:
            raise KeyError(f"no tensor named {name!r} in {self.path!r} ({len(self.tensors)} tensors)")
        return self.tensors[name]

    def close(self) -> None:
        """Drop the memory map (tensors already loaded stay valid: they are copies)."""
        self._data = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"GGUFFile({self.path!r}, version={self.version}, {len(self.metadata)} metadata keys, "
            f"{len(self.tensors)} tensors)"
        )


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse the GGUF file at `path` (header, metadata, tensor table); tensor data stays on disk."""
    return GGUFFile(path)


# --- dequantization -------------------------------------------------------------------------

SUPPORTED_DEQUANT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1")


def _blocks(raw: np.ndarray, gtype: GGMLType, n_elements: int) -> np.ndarray:
    """View the raw bytes as one row per block: `[n_blocks, type_size]` uint8."""
    return raw.reshape(n_elements // gtype.block_size, gtype.type_size)


def _fp16(col: np.ndarray) -> np.ndarray:
    """Two-byte little-endian columns `[n, 2]` -> float32 `[n, 1]` (exact: fp16 fits in fp32)."""
    return np.ascontiguousarray(col).view("<f2").astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Unpack `[n, 16]` bytes into `[n, 32]` 4-bit values 0..15.

    ggml puts element j (j < 16) in the low nibble of byte j and element j + 16 in its high
    nibble, so the low nibbles of all 16 bytes come first, then the high nibbles.
    """
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize(
    raw: np.ndarray, ggml_type: str, n_elements: int, tensor: str = "<unnamed>"
) -> np.ndarray:
    """Decode `n_elements` values of type `ggml_type` from the bytes `raw` into float32.

    Block layouts (32 values per block for the quantized types):
      Q8_0: fp16 scale d, 32 int8 q            -> d * q
      Q4_0: fp16 d, 16 bytes of 4-bit q        -> (q - 8) * d
      Q4_1: fp16 d, fp16 minimum m, 16 bytes q -> q * d + m
    The arithmetic is float32 in the same order as ggml, so results match it exactly.
    """
    if ggml_type not in _GGML_TYPE_BY_NAME:
        raise GGUFError(f"tensor {tensor!r}: unknown ggml type {ggml_type!r}")
    if ggml_type not in SUPPORTED_DEQUANT_TYPES:
        raise GGUFError(
            f"tensor {tensor!r} has ggml type {ggml_type}, which this reader cannot dequantize "
            f"(supported: {', '.join(SUPPORTED_DEQUANT_TYPES)})"
        )
    gtype = _GGML_TYPE_BY_NAME[ggml_type]
    expected = n_elements // gtype.block_size * gtype.type_size
    if n_elements % gtype.block_size or raw.size != expected:
        raise GGUFError(
            f"tensor {tensor!r}: {raw.size} bytes do not hold {n_elements} {ggml_type} values "
            f"(expected {expected} bytes)"
        )
    raw = np.asarray(raw, dtype=np.uint8)
    if ggml_type == "F32":
        return raw.view("<f4").astype(np.float32)  # astype copies out of the read-only map
    if ggml_type == "F16":
        return raw.view("<f2").astype(np.float32)
    if ggml_type == "BF16":
        # bfloat16 is the top half of a float32: shift the 16 bits into place.
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32)
    blocks = _blocks(raw, gtype, n_elements)
    # A scale that is inf or NaN gives NaN values, exactly as in ggml: no warning needed.
    with np.errstate(invalid="ignore", over="ignore"):
        return _dequantize_blocks(blocks, ggml_type)


def _dequantize_blocks(blocks: np.ndarray, ggml_type: str) -> np.ndarray:
    """The block formulas of Q8_0, Q4_0 and Q4_1 on `[n_blocks, type_size]` bytes."""
    if ggml_type == "Q8_0":
        d = _fp16(blocks[:, :2])
        q = blocks[:, 2:].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    if ggml_type == "Q4_0":
        d = _fp16(blocks[:, :2])
        q = _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
        return (d * q.astype(np.float32)).reshape(-1)
    # Q4_1
    d = _fp16(blocks[:, :2])
    m = _fp16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return (d * q + m).reshape(-1)


# --- a llama GGUF in this package's terms ---------------------------------------------------
# What loading a Llama needs from the file, without the model itself (``Llama.from_gguf`` builds
# it): metadata -> LlamaConfig, llama.cpp tensor names -> Hugging Face names, and the tensors,
# dequantized, with q/k rows permuted from GGUF's interleaved RoPE layout to rotate-half.
# gguf_writer.py holds the inverse tables.

# llama.cpp name of a per-layer tensor (after "blk.{i}.") -> Hugging Face name (after "model.layers.{i}.")
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")
_ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1+ files store the llama3 frequency factors as a tensor


def gguf_to_hf_name(name: str) -> str:
    """The Hugging Face (and this package's) name of a llama.cpp tensor name.

    ``"token_embd.weight"`` -> ``"model.embed_tokens.weight"``,
    ``"blk.3.attn_q.weight"`` -> ``"model.layers.3.self_attn.q_proj.weight"``,
    ``"output.weight"`` -> ``"lm_head.weight"``. Raises ``KeyError`` for a name it does not know.
    """
    match = _LAYER_RE.fullmatch(name)
    if match:
        layer, part, kind = match.groups()
        if part in _LAYER_NAMES:
            return f"model.layers.{int(layer)}.{_LAYER_NAMES[part]}.{kind}"
    else:
        base, _, kind = name.rpartition(".")
        if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
            return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise KeyError(f"no Llama tensor corresponds to the GGUF tensor name {name!r}")


def _float(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that rounds to it (9.9999997e-06 -> 1e-05).

    Both are the same float32, so models compute identically; the config just reads better.
    """
    value = float(value)
    shortest = float(str(np.float32(value)))
    return shortest if np.float32(shortest) == np.float32(value) else value


def _llama3_scaling(gguf: GGUFFile, arch: str, head_dim: int, theta: float) -> dict[str, Any]:
    """Recovers Hugging Face's llama3 ``rope_scaling`` dict from a ``rope_freqs.weight`` tensor.

    llama.cpp's converter does not write the llama3 parameters as metadata: it stores the
    ``head_dim / 2`` factors that divide each frequency. We take the factor from metadata (or the
    largest stored factor), Llama 3.1's ``low_freq_factor=1``, ``high_freq_factor=4`` and the
    metadata's original context (or 8192), and accept them only if they reproduce the tensor.
    """
    md = gguf.metadata
    factors = gguf.load_tensor(_ROPE_FREQS).float().reshape(-1)
    if factors.numel() != head_dim // 2:
        raise ValueError(f"{_ROPE_FREQS} has {factors.numel()} values; head_dim / 2 = {head_dim // 2} expected")
    factor = md.get(f"{arch}.rope.scaling.factor") or float(factors.max())
    original = md.get(f"{arch}.rope.scaling.original_context_length") or 8192
    scaling = {"rope_type": "llama3", "factor": _float(factor), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": int(original)}
    expected = rope_inv_freq(head_dim, theta) / factors
    got = rope_inv_freq(head_dim, theta, scaling)
    if not torch.allclose(got, expected, rtol=1e-4, atol=0):
        raise ValueError(
            f"the file's {_ROPE_FREQS} factors are not llama3 RoPE scaling with {scaling}; "
            "this package implements only default and llama3 RoPE"
        )
    return scaling


# Sane bounds on a llama GGUF's hyperparameters, checked before anything is allocated: a corrupt
# or hostile file must not make the loader build a million layers or gigabytes of RoPE tables.
# Each is well above every published Llama-architecture model (405B: 126 layers, dim 16384,
# 131072 context; the largest vocabularies ~256k).
MAX_LAYERS = 512  # llama.cpp's LLAMA_MAX_LAYERS
MAX_CONTEXT = 2**20
MAX_ROPE_TABLE = 2**27  # context_length * head_dim: each RoPE table at most 512 MB in float32
MAX_VOCAB = 2**21
MAX_DIM = 2**16
MAX_HIDDEN = 2**18
MAX_HEADS = 2**10
ROPE_BASE_RANGE = (1.0, 1e12)
RMS_EPS_RANGE = (1e-12, 1.0)


def _check_llama_metadata(gguf: GGUFFile, arch: str, vocab_size: int) -> None:
    """Raises :class:`GGUFError` naming the field for any hyperparameter outside sane bounds.

    Integers must be integers within bounds, the RoPE base and RMSNorm epsilon finite and in
    range, the special-token ids inside the vocabulary, and ``block_count`` must equal the number
    of layers whose tensors the file holds.
    """
    md = gguf.metadata

    def integer(key: str, low: int, high: int, required: bool = True) -> int | None:
        value = md.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise GGUFError(f"{gguf.path!r}: {key} = {value!r} is not an integer in [{low}, {high}]")
        return value

    def number(key: str, low: float, high: float) -> None:
        value = md.get(key)
        if value is None:
            return
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
            raise GGUFError(f"{gguf.path!r}: {key} = {value!r} is not a finite number in [{low:g}, {high:g}]")

    n_layers = integer(f"{arch}.block_count", 1, MAX_LAYERS)
    context = integer(f"{arch}.context_length", 1, MAX_CONTEXT)
    dim = integer(f"{arch}.embedding_length", 1, MAX_DIM)
    integer(f"{arch}.feed_forward_length", 1, MAX_HIDDEN)
    n_heads = integer(f"{arch}.attention.head_count", 1, MAX_HEADS)
    n_kv_heads = integer(f"{arch}.attention.head_count_kv", 1, n_heads, required=False) or n_heads
    if dim % n_heads or n_heads % n_kv_heads:
        raise GGUFError(f"{gguf.path!r}: {arch}.attention.head_count = {n_heads} must divide embedding_length "
                        f"= {dim} and be a multiple of head_count_kv = {n_kv_heads}")
    if context * (dim // n_heads) > MAX_ROPE_TABLE:
        raise GGUFError(f"{gguf.path!r}: {arch}.context_length = {context} with head_dim {dim // n_heads} needs "
                        f"RoPE tables of {context * (dim // n_heads)} values (at most {MAX_ROPE_TABLE})")
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or not 1 <= vocab_size <= MAX_VOCAB:
        raise GGUFError(f"{gguf.path!r}: vocabulary size {vocab_size} is not in [1, {MAX_VOCAB}]")
    stated = integer(f"{arch}.vocab_size", 1, MAX_VOCAB, required=False)
    if stated is not None and stated != vocab_size:
        raise GGUFError(f"{gguf.path!r}: {arch}.vocab_size = {stated} but the tokenizer has {vocab_size} tokens")
    for suffix in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        integer(f"{arch}.{suffix}", 1, MAX_DIM, required=False)
    number(f"{arch}.rope.freq_base", *ROPE_BASE_RANGE)
    number(f"{arch}.attention.layer_norm_rms_epsilon", *RMS_EPS_RANGE)
    number(f"{arch}.rope.scaling.factor", 1.0, 1e4)
    integer(f"{arch}.rope.scaling.original_context_length", 1, MAX_CONTEXT, required=False)
    for key in md:
        if key.startswith("tokenizer.ggml.") and key.endswith("_token_id"):
            integer(key, 0, vocab_size - 1)
    layers = {int(m.group(1)) for m in map(_LAYER_RE.fullmatch, gguf.tensors) if m}
    if layers and layers != set(range(n_layers)):
        raise GGUFError(f"{gguf.path!r}: {arch}.block_count = {n_layers}, but the file holds tensors of layers "
                        f"{min(layers)}..{max(layers)} ({len(layers)} distinct)")


def config_from_gguf(gguf: GGUFFile | str | os.PathLike) -> LlamaConfig:
    """The :class:`LlamaConfig` described by a llama GGUF file's metadata.

    Reads ``{arch}.block_count``, ``embedding_length``, ``feed_forward_length``,
    ``attention.head_count``, ``attention.head_count_kv``, ``rope.freq_base``,
    ``attention.layer_norm_rms_epsilon`` and ``context_length``; the vocabulary size is the length
    of ``tokenizer.ggml.tokens`` (or ``{arch}.vocab_size``, or the embedding's rows); tied
    embeddings mean the file has no ``output.weight``. Raises ``ValueError`` for a non-llama
    architecture, missing keys, or features this package does not implement, and its subclass
    ``GGUFError`` naming the field for a value outside sane bounds (see ``_check_llama_metadata``).
    """
    if not isinstance(gguf, GGUFFile):
        gguf = read_gguf(gguf)
    md = gguf.metadata
    arch = md.get("general.architecture")
    if arch is None:
        raise ValueError(f"{gguf.path!r}: metadata lacks 'general.architecture'; is this a model file?")
    if arch != "llama":
        raise ValueError(
            f"{gguf.path!r} holds a {arch!r} model; only the 'llama' architecture (Llama, SmolLM2, "
            "TinyLlama, ...) is supported"
        )
    suffixes = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.layer_norm_rms_epsilon", "context_length"]
    missing = [f"{arch}.{s}" for s in suffixes if f"{arch}.{s}" not in md]
    if missing:
        raise ValueError(f"{gguf.path!r}: metadata lacks the required keys {missing}")

    def get(suffix: str, default: Any = None) -> Any:
        return md.get(f"{arch}.{suffix}", default)

    for suffix in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
        if isinstance(get(suffix), list):
            raise ValueError(f"{arch}.{suffix} varies per layer ({get(suffix)[:4]}...); not supported")

    if "tokenizer.ggml.tokens" in md:
        vocab_size = len(md["tokenizer.ggml.tokens"])
    elif get("vocab_size") is not None:
        vocab_size = get("vocab_size")  # checked to be an integer in range below
    elif "token_embd.weight" in gguf.tensors:
        vocab_size = gguf.tensors["token_embd.weight"].shape[0]
    else:
        raise ValueError(f"{gguf.path!r}: cannot tell the vocabulary size (no tokens, vocab_size or token_embd)")
    _check_llama_metadata(gguf, arch, vocab_size)

    n_heads = int(get("attention.head_count"))
    dim = int(get("embedding_length"))
    theta = _float(get("rope.freq_base", 10000.0))
    head_dim = dim // n_heads if n_heads else 0
    for suffix in ("attention.key_length", "attention.value_length", "rope.dimension_count"):
        value = get(suffix)
        if value is not None and int(value) != head_dim:
            raise ValueError(
                f"{arch}.{suffix} = {value} differs from embedding_length / head_count = {head_dim}; "
                "this package's Llama rotates and attends over the whole head"
            )

    rope_scaling = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise ValueError(f"{arch}.rope.scaling.type = {scaling_type!r} is not supported (only llama3 scaling)")
    if _ROPE_FREQS in gguf.tensors:
        rope_scaling = _llama3_scaling(gguf, arch, head_dim, theta)

    return LlamaConfig(
        vocab_size=vocab_size,
        dim=dim,
        n_layers=int(get("block_count")),
        n_heads=n_heads,
        n_kv_heads=int(get("attention.head_count_kv", n_heads)),
        hidden_dim=int(get("feed_forward_length")),
        norm_eps=_float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=theta,
        rope_scaling=rope_scaling,
        max_seq_len=int(get("context_length")),
        tie_embeddings="output.weight" not in gguf.tensors,
    )


def llama_state_dict(gguf: GGUFFile, config: LlamaConfig, dtype: torch.dtype = torch.float32
                     ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a llama GGUF file under Hugging Face (this package's) names, and the GGUF
    names it does not know.

    Every tensor is dequantized by this module (F32, F16, BF16, Q8_0, Q4_0, Q4_1) in float32 and
    cast to ``dtype``; q and k projections are permuted from GGUF's interleaved RoPE layout to
    rotate-half; with tied embeddings ``lm_head.weight`` is the embedding tensor.
    """
    state_dict: dict[str, torch.Tensor] = {}
    unknown = []
    for name in gguf.tensors:
        if name == _ROPE_FREQS:  # consumed by config_from_gguf
            continue
        try:
            hf_name = gguf_to_hf_name(name)
        except KeyError:
            unknown.append(name)
            continue
        try:
            tensor = gguf.load_tensor(name, torch.float32)
        except GGUFError as e:
            raise GGUFError(f"{gguf.path!r}: {e}") from None
        if hf_name.endswith("q_proj.weight"):
            tensor = permute_qk_for_rotate_half(tensor, config.n_heads)
        elif hf_name.endswith("k_proj.weight"):
            tensor = permute_qk_for_rotate_half(tensor, config.n_kv_heads)
        state_dict[hf_name] = tensor.to(dtype)
    if config.tie_embeddings and "model.embed_tokens.weight" in state_dict:
        state_dict["lm_head.weight"] = state_dict["model.embed_tokens.weight"]
    return state_dict, unknown


def check_llama_keys(expected: dict[str, torch.Tensor], state_dict: dict[str, torch.Tensor], unknown: list[str],
                     source: str) -> None:
    """Raises ``ValueError`` listing the missing, unexpected (``unknown`` GGUF names included) and
    wrongly shaped tensors of ``state_dict`` against a model's ``expected`` state dict."""
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected)) + [f"{n} (GGUF name)" for n in unknown]
    wrong_shape = [
        f"{k}: file {tuple(v.shape)}, config {tuple(expected[k].shape)}"
        for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape
    ]
    if missing or unexpected or wrong_shape:
        def short(items: list[str]) -> str:
            return f"{items[:12]}{' ...' if len(items) > 12 else ''}"

        raise ValueError(
            f"the tensors of {source!r} do not match the Llama its metadata describes: "
            f"missing {short(missing)}; unexpected {short(unexpected)}; wrong shape {short(wrong_shape)}"
        )
