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
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

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
