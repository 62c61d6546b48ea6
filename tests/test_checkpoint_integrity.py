"""Checkpoints that refuse to load anything but what was saved (`llama_from_scratch.trainer`).

Every tensor's SHA-256 (dtype, shape, bytes) sits in the safetensors header and the SHA-256 of
both data files in config.json; they are checked here against `hashlib` applied to what
`safetensors.safe_open` and the raw files give. A seeded fuzz campaign of 200+ mutated checkpoints
(bit flips, truncations, edited fields, files re-written with inconsistent contents) must end, for
every mutation, in `CheckpointError` or in exactly the saved run (weights, optimizer state, step,
history and RNG compared bit for bit): never a silently different run, never another exception.
Saves killed midway (SIGKILL) leave a temporary folder that the next save removes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.data import pack_tokens, synthetic_corpus
from llama_from_scratch.model import Llama
from llama_from_scratch.trainer import CheckpointError, Trainer, TrainConfig, save_checkpoint

VOCAB, EOS, BLOCK = 64, 63, 16
MODEL, STATE, CONFIG = "model.safetensors", "training_state.pt", "config.json"


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def make_trainer(seed: int = 0) -> Trainer:
    torch.manual_seed(seed)
    config = LlamaConfig.tiny(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, hidden_dim=64,
                              max_seq_len=32)
    blocks = pack_tokens(synthetic_corpus(100, vocab_size=VOCAB, seed=0), BLOCK, EOS)
    train_config = TrainConfig(max_steps=4, batch_size=4, max_lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_interval=0,
                               device="cpu", dtype="fp32", progress=False, seed=7)
    return Trainer(Llama(config), blocks, None, train_config)


def snapshot(trainer: Trainer) -> dict:
    """Everything a resumed run depends on."""
    opt = trainer.optimizer.state_dict()
    return {
        "step": trainer.step,
        "history": json.dumps(trainer.history),
        "model": {k: v.detach().clone() for k, v in trainer.model.state_dict().items()},
        "opt_state": {(pid, k): v.clone() if isinstance(v, torch.Tensor) else v
                      for pid, entry in opt["state"].items() for k, v in entry.items()},
        "opt_groups": repr(opt["param_groups"]),
        "rng": torch.get_rng_state().clone(),
    }


def same(a: dict, b: dict) -> bool:
    def eq(x, y):
        if isinstance(x, torch.Tensor) or isinstance(y, torch.Tensor):
            return isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and x.dtype == y.dtype \
                and x.shape == y.shape and torch.equal(x, y)
        if isinstance(x, dict):
            return isinstance(y, dict) and x.keys() == y.keys() and all(eq(x[k], y[k]) for k in x)
        return x == y

    return eq(a, b)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, dict]:
    """A checkpoint after 2 training steps, and the snapshot of a trainer that loaded it."""
    trainer = make_trainer()
    trainer.train(steps=2)
    path = trainer.save_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_000002")
    reference = make_trainer(seed=5)
    reference.load_checkpoint(path)
    return path, snapshot(reference)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _set_file_checksum(folder: Path, name: str) -> None:
    """Re-computes config.json's checksum of `name`, as a careless tool re-writing the file would."""
    config = json.loads((folder / CONFIG).read_text())
    config["sha256"][name] = _sha((folder / name).read_bytes())
    (folder / CONFIG).write_text(json.dumps(config))


# ---------------------------------------------------------------------------------------------
# the checksums themselves


def test_checksums_equal_hashlib_of_what_was_written(saved):
    path, _ = saved
    config = json.loads((path / CONFIG).read_text())
    assert config["format"] == 2
    for name in (MODEL, STATE):
        assert config["sha256"][name] == _sha((path / name).read_bytes())
    with safe_open(str(path / MODEL), framework="pt") as f:
        sums = json.loads(f.metadata()["sha256"])
        assert set(sums) == set(f.keys()) and len(sums) > 5
        for name in f.keys():
            t = f.get_tensor(name)
            expected = _sha(f"{t.dtype}{tuple(t.shape)}".encode() + t.reshape(-1).view(torch.uint8).numpy().tobytes())
            assert sums[name] == expected, name


def test_altered_tensor_is_named(saved, tmp_path):
    path, _ = saved
    bad = Path(shutil.copytree(path, tmp_path / "bad"))
    with safe_open(str(path / MODEL), framework="pt") as f:
        header = f.metadata()
    tensors = load_file(str(path / MODEL))
    name = sorted(tensors)[1]
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = torch.nextafter(tensors[name].view(-1)[3], torch.tensor(1e9))  # one ulp
    save_file(tensors, str(bad / MODEL), metadata=header)
    _set_file_checksum(bad, MODEL)
    with pytest.raises(CheckpointError, match=f"corrupt: tensors \\['{name}'\\]"):
        make_trainer().load_checkpoint(bad)


@pytest.mark.parametrize("field, value, message", [
    ("step", "x", "step 'x' is not a non-negative integer"),
    ("step", -5, "step -5 is not"),
    ("step", 1e30, "step 1e\\+30 is not"),
    ("step", 3, "differs from step 3"),
    ("format", 1, "format 1; this version reads format 2"),
    ("sha256", None, "no sha256 checksums"),
    ("train", [1], "train is a list"),
])
def test_config_fields_are_validated(saved, tmp_path, field, value, message):
    path, _ = saved
    bad = Path(shutil.copytree(path, tmp_path / "bad"))
    config = json.loads((bad / CONFIG).read_text())
    config[field] = value
    (bad / CONFIG).write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=message):
        make_trainer().load_checkpoint(bad)


# ---------------------------------------------------------------------------------------------
# fuzz campaign


def _state_mutations() -> list[tuple[str, object]]:
    """Training states re-written with a valid checksum but inconsistent contents."""

    def opt(fn):
        def apply(state):
            fn(state["optimizer"])
        return apply

    def first_entry(o):
        return o["state"][sorted(o["state"])[0]]

    def setitem(key, value):
        def apply(state):
            state[key] = value
        return apply

    return [
        ("step x", setitem("step", "x")), ("step -5", setitem("step", -5)), ("step 1e30", setitem("step", 1e30)),
        ("step +1", lambda s: s.__setitem__("step", s["step"] + 1)),
        ("lr nan", opt(lambda o: o["param_groups"][0].__setitem__("lr", float("nan")))),
        ("lr -1", opt(lambda o: o["param_groups"][0].__setitem__("lr", -1.0))),
        ("betas inf", opt(lambda o: o["param_groups"][0].__setitem__("betas", (0.9, float("inf"))))),
        ("exp_avg wrong shape", opt(lambda o: first_entry(o).__setitem__("exp_avg", torch.zeros(3, 5)))),
        ("exp_avg_sq transposed", opt(lambda o: first_entry(o).__setitem__(
            "exp_avg_sq", first_entry(o)["exp_avg_sq"].reshape(-1, 1)))),
        ("exp_avg nan", opt(lambda o: first_entry(o)["exp_avg"].view(-1).__setitem__(0, float("nan")))),
        ("state for param 999", opt(lambda o: o["state"].__setitem__(999, {"step": torch.tensor(1.0)}))),
        ("param group lost", opt(lambda o: o.__setitem__("param_groups", o["param_groups"][:1]))),
        ("no param_groups", opt(lambda o: o.pop("param_groups"))),
        ("optimizer None", setitem("optimizer", None)),
        ("rng torch garbage", lambda s: s["rng"].__setitem__("torch", torch.zeros(7, dtype=torch.uint8))),
        ("rng numpy missing", lambda s: s["rng"].pop("numpy")),
        ("rng python garbage", lambda s: s["rng"].__setitem__("python", [1, [2], None])),
        ("history not list", setitem("history", {"a": 1})),
        ("train differs", lambda s: s["train"].__setitem__("max_lr", 0.5)),
        ("format 1", setitem("format", 1)),
    ]


def _config_mutations() -> list[tuple[str, str]]:
    """config.json texts: edited fields and malformed JSON."""
    return [
        ("deep nesting", "[" * 100_000 + "]" * 100_000),
        ("a list", "[1, 2]"),
        ("NaN lr", None), ("model list", None), ("optimizer class 5", None), ("checksum int", None),
        ("unknown train field", None), ("model dim", None), ("optimizer GaLore", None), ("step true", None),
    ]


def _edit_config(config: dict, kind: str) -> None:
    if kind == "NaN lr":
        config["train"]["max_lr"] = float("nan")
    elif kind == "model list":
        config["model"] = [1]
    elif kind == "optimizer class 5":
        config["optimizer_class"] = 5
    elif kind == "checksum int":
        config["sha256"][MODEL] = 5
    elif kind == "unknown train field":
        config["train"]["lr"] = 1.0
    elif kind == "model dim":
        config["model"]["dim"] = 64
    elif kind == "optimizer GaLore":
        config["optimizer_class"] = "GaLoreAdamW"
    elif kind == "step true":
        config["step"] = True


def _mutations(path: Path, seed: int = 20261207):
    """Yields (description, function that damages a copy of the checkpoint folder)."""
    rng = random.Random(seed)
    sizes = {name: (path / name).stat().st_size for name in (MODEL, STATE, CONFIG)}
    header_len = 8 + int.from_bytes((path / MODEL).read_bytes()[:8], "little")

    def flip(name: str, pos: int, bit: int):
        def apply(folder: Path):
            data = bytearray((folder / name).read_bytes())
            data[pos] ^= 1 << bit
            (folder / name).write_bytes(bytes(data))
        return apply

    for i in range(40):  # the safetensors header: names, dtypes, shapes, offsets, checksums
        yield f"flip header byte {i}", flip(MODEL, rng.randrange(header_len), rng.randrange(8))
    for i in range(40):  # the weights
        yield f"flip weight byte {i}", flip(MODEL, rng.randrange(header_len, sizes[MODEL]), rng.randrange(8))
    for i in range(45):
        yield f"flip state byte {i}", flip(STATE, rng.randrange(sizes[STATE]), rng.randrange(8))
    for i in range(35):
        yield f"flip config byte {i}", flip(CONFIG, rng.randrange(sizes[CONFIG]), rng.randrange(8))
    for i in range(15):
        name = rng.choice([MODEL, STATE, CONFIG])
        cut = rng.randrange(sizes[name])

        def truncate(folder: Path, name=name, cut=cut):
            (folder / name).write_bytes((folder / name).read_bytes()[:cut])
        yield f"truncate {name} at {cut}", truncate
    for name in (MODEL, STATE, CONFIG):
        yield f"delete {name}", lambda folder, name=name: (folder / name).unlink()
    for kind, text in _config_mutations():
        def edit(folder: Path, kind=kind, text=text):
            if text is None:
                config = json.loads((folder / CONFIG).read_text())
                _edit_config(config, kind)
                text = json.dumps(config)
            (folder / CONFIG).write_text(text)
        yield f"config {kind}", edit
    for kind, change in _state_mutations():
        def restate(folder: Path, change=change):
            state = torch.load(folder / STATE, weights_only=True)
            change(state)
            torch.save(state, folder / STATE)
            _set_file_checksum(folder, STATE)
        yield f"state {kind}", restate
    for i in range(6):  # weights re-written (file checksum updated), tensor checksums left as they were
        def reweigh(folder: Path, i=i):
            with safe_open(str(folder / MODEL), framework="pt") as f:
                header = f.metadata()
            tensors = load_file(str(folder / MODEL))
            name = sorted(tensors)[i % len(tensors)]
            if i == 5:
                header["aliases"] = json.dumps({"lm_head.weight": name})
            else:
                tensors[name] = tensors[name] * (1 + 2.0 ** -(10 + i))
            save_file(tensors, str(folder / MODEL), metadata=header)
            _set_file_checksum(folder, MODEL)
        yield f"weights re-written {i}", reweigh


def test_fuzzed_checkpoints_load_exactly_or_raise_checkpoint_error(saved, tmp_path):
    """200+ seeded mutations: CheckpointError, or exactly the saved run; nothing else."""
    path, reference = saved
    outcomes: dict[str, list[str]] = {"CheckpointError": [], "identical": [], "different": []}
    for i, (what, damage) in enumerate(_mutations(path)):
        folder = Path(shutil.copytree(path, tmp_path / f"m{i}"))
        damage(folder)
        trainer = make_trainer(seed=5)
        before = snapshot(trainer)
        try:
            trainer.load_checkpoint(folder)
        except CheckpointError:
            outcomes["CheckpointError"].append(what)
            after = snapshot(trainer)  # a refused checkpoint changes nothing
            assert same({k: after[k] for k in ("step", "model")}, {k: before[k] for k in ("step", "model")}), what
        else:
            outcomes["identical" if same(snapshot(trainer), reference) else "different"].append(what)
        # any other exception propagates and fails the test, naming nothing but its traceback
        shutil.rmtree(folder)
    total = sum(len(v) for v in outcomes.values())
    assert total >= 200
    assert outcomes["different"] == [], outcomes["different"]
    assert len(outcomes["CheckpointError"]) >= 190, {k: len(v) for k, v in outcomes.items()}


# ---------------------------------------------------------------------------------------------
# saves killed midway


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_folders_are_cleaned_on_the_next_save(tmp_path):
    trainer = make_trainer()
    dead = _dead_pid()
    stale = [tmp_path / f".step_000001.tmp-{dead}-abc", tmp_path / ".step_000001.tmp-x8f2k"]  # old naming too
    live = tmp_path / f".step_000009.tmp-{os.getppid()}-def"  # a save in progress in a living process
    moved = tmp_path / f".step_000003.old-{dead}"  # a killed save had moved the old checkpoint aside
    unrelated = tmp_path / f".notes.tmp-{dead}-x"  # same naming, but holds files no save writes
    for folder in stale + [live, moved, unrelated]:
        folder.mkdir()
    (stale[0] / "model.safetensors").write_bytes(b"half")
    (moved / "config.json").write_text("previous checkpoint")
    (unrelated / "notes.txt").write_text("keep me")
    trainer.save_checkpoint(tmp_path / "step_000000")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted([live.name, unrelated.name, "step_000000", "step_000003"])
    assert (tmp_path / "step_000003" / "config.json").read_text() == "previous checkpoint"


def test_save_killed_with_sigkill_is_cleaned_and_resume_is_exact(tmp_path):
    """A child process is killed (SIGKILL) in the middle of writing; the next save removes its
    temporary folder and the checkpoint written then loads into the identical state."""
    script = textwrap.dedent(f"""
        import sys, time, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_checkpoint_integrity import make_trainer
        import llama_from_scratch.trainer as t
        trainer = make_trainer()
        trainer.train(steps=1)
        def stall(*a, **k):
            print("writing", flush=True)
            time.sleep(600)
        t.torch.save = stall
        trainer.save_checkpoint({str(tmp_path / "step_000001")!r})
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    leftovers = [p.name for p in tmp_path.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(f".step_000001.tmp-{child.pid}-"), leftovers

    trainer = make_trainer()
    trainer.train(steps=1)
    path = trainer.save_checkpoint(tmp_path / "step_000001")
    assert [p.name for p in tmp_path.iterdir()] == ["step_000001"]
    expected = snapshot(trainer)
    resumed = make_trainer(seed=3)
    torch.manual_seed(99)
    resumed.load_checkpoint(path)
    assert same(snapshot(resumed), expected)
    losses = [[r["train_loss"] for r in t.train()] for t in (resumed, trainer)]
    assert losses[0] == losses[1] and len(losses[0]) == 4  # the rest of the run is identical too
