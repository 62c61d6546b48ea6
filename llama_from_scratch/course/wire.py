"""What crosses between the grader and a student's process: data, never code.

The grader runs a student's functions in a separate, sandboxed process and compares what comes back
in its own process. Everything that travels is encoded here, as one JSON header plus one
safetensors blob for the tensors. Nothing is pickled: decoding can only ever produce ``None``,
``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``, ``set``,
``torch.Tensor``, ``torch.Size``, ``torch.dtype`` and the three markers below, so an object with
a rigged ``__eq__`` cannot reach the grader.

Markers a check may put in the arguments it sends:

- ``Construct("torch.nn.Linear", 4, 3, bias=False)``: an object built on the student's side from an
  importable name (only under the libraries in ``CONSTRUCT_PREFIXES``), for inputs that are not data.
- ``Callback(fn)``: a grader-side function the student's code may call with data (a reference
  model's forward, a reward function); its results travel back as data.

Values that are not data on the student's side (an instance of the student's class, a module)
come back as a handle, which the grader's ``RemoteObject`` wraps.

This file imports only the standard library, torch and safetensors: the student's process loads it
from a private copy, without the rest of the package.
"""

from __future__ import annotations

import base64
import json
import math
import struct
from typing import Any, Callable

import torch
from safetensors.torch import load as _st_load
from safetensors.torch import save as _st_save

CONSTRUCT_PREFIXES = ("torch.", "transformers.", "tiktoken.", "numpy.", "gguf.", "peft.", "collections.")
MAX_DEPTH = 64
MAX_ITEMS = 2_000_000
_HEADER = struct.Struct("<QQ")  # JSON length, safetensors length


class WireError(ValueError):
    """A message that is not what the protocol allows (malformed, too deep, too large, wrong type)."""


class Construct:
    """An argument built on the student's side: ``target(*args, **kwargs)``, ``target`` a dotted
    name under one of ``CONSTRUCT_PREFIXES``; ``method`` (e.g. ``"from_pretrained"``) is called on
    it instead when given."""

    def __init__(self, target: str, *args: Any, method: str | None = None, **kwargs: Any) -> None:
        if not isinstance(target, str) or not target.startswith(CONSTRUCT_PREFIXES):
            raise ValueError(f"Construct target {target!r} is not under {CONSTRUCT_PREFIXES}")
        self.target, self.method, self.args, self.kwargs = target, method, args, kwargs

    def build(self) -> Any:
        """Import ``target`` and call it (used on whichever side the object must live)."""
        import importlib

        module_name, _, attr_path = self.target.partition(".")
        obj: Any = importlib.import_module(module_name)
        parts = attr_path.split(".") if attr_path else []
        for i, part in enumerate(parts):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                obj = importlib.import_module(".".join([module_name, *parts[: i + 1]]))
        if self.method:
            obj = getattr(obj, self.method)
        return obj(*self.args, **self.kwargs)

    def __repr__(self) -> str:
        return f"Construct({self.target!r})"


class Callback:
    """A grader-side function handed to the student's code; it is called with data only."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        if not callable(fn):
            raise TypeError("Callback wraps a function")
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)


class Handle:
    """A reference to an object that lives on the student's side (decoded form of ``__handle__``)."""

    __slots__ = ("id", "type_name")

    def __init__(self, id: int, type_name: str) -> None:
        self.id, self.type_name = id, type_name

    def __repr__(self) -> str:
        return f"<{self.type_name} in the student's process>"


class Encoder:
    """Turns a value tree into (JSON-able header, tensors). ``on_object`` decides what to do with a
    value that is not data: raise (the default), or return a JSON-able replacement (a handle)."""

    def __init__(self, on_object: Callable[[Any], Any] | None = None,
                 on_callback: Callable[[Callback], Any] | None = None) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self.on_object = on_object
        self.on_callback = on_callback
        self.items = 0

    def encode(self, value: Any, depth: int = 0) -> Any:
        self.items += 1
        if depth > MAX_DEPTH or self.items > MAX_ITEMS:
            raise WireError("value too deep or too large to send")
        if value is None or isinstance(value, (bool, str)):
            return value
        if isinstance(value, int):
            return int(value)
        if isinstance(value, float):
            return value if math.isfinite(value) else {"__float__": repr(float(value))}
        if isinstance(value, torch.Tensor):
            return self._tensor(value)
        if isinstance(value, torch.Size):
            return {"__size__": [int(v) for v in value]}
        if isinstance(value, torch.dtype):
            return {"__dtype__": str(value).removeprefix("torch.")}
        if isinstance(value, torch.device):
            return {"__device__": "cpu"}
        if isinstance(value, (bytes, bytearray)):
            return {"__bytes__": base64.b64encode(bytes(value)).decode()}
        if isinstance(value, Construct):
            return {"__construct__": value.target, "method": value.method,
                    "args": self.encode(list(value.args), depth + 1),
                    "kwargs": self.encode(dict(value.kwargs), depth + 1)}
        if isinstance(value, Callback):
            if self.on_callback is None:
                raise WireError("a Callback can only be sent to the student's process")
            return {"__callback__": self.on_callback(value)}
        if isinstance(value, Handle):
            return {"__handle__": value.id}
        if type(value).__module__ == "numpy":
            import numpy as np

            if isinstance(value, np.ndarray):
                return self._tensor(torch.from_numpy(np.ascontiguousarray(value)))
            if isinstance(value, np.generic):
                return self.encode(value.item(), depth)
        if isinstance(value, dict):
            return {"__dict__": [[self.encode(k, depth + 1), self.encode(v, depth + 1)] for k, v in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [self.encode(v, depth + 1) for v in value]}
        if isinstance(value, list):
            return [self.encode(v, depth + 1) for v in value]
        if isinstance(value, (set, frozenset)):
            return {"__set__": [self.encode(v, depth + 1) for v in value]}
        if self.on_object is not None:
            return self.on_object(value)
        raise WireError(f"cannot send a {type(value).__name__}: only data (tensors, numbers, strings, "
                        "lists, tuples, dicts, sets) travels")

    def _tensor(self, t: torch.Tensor) -> dict[str, Any]:
        key = str(len(self.tensors))
        requires_grad = t.requires_grad
        t = t.detach().cpu()
        meta: dict[str, Any] = {"__tensor__": key}
        if t.is_complex():
            meta["complex"] = True
            t = torch.view_as_real(t)
        if requires_grad:
            meta["requires_grad"] = True
        self.tensors[key] = t.clone().contiguous()
        return meta


class Decoder:
    """The inverse of ``Encoder``; ``on_handle``/``on_construct``/``on_callback`` say what the
    markers become on this side (by default a marker this side may not receive is refused)."""

    def __init__(self, tensors: dict[str, torch.Tensor], on_handle: Callable[[int], Any] | None = None,
                 on_construct: Callable[[Construct], Any] | None = None,
                 on_callback: Callable[[int], Any] | None = None) -> None:
        self.tensors = tensors
        self.on_handle = on_handle
        self.on_construct = on_construct
        self.on_callback = on_callback
        self.items = 0

    def decode(self, value: Any, depth: int = 0) -> Any:
        self.items += 1
        if depth > MAX_DEPTH or self.items > MAX_ITEMS:
            raise WireError("value too deep or too large")
        if value is None or isinstance(value, (bool, int, float, str)):
            return value
        if isinstance(value, list):
            return [self.decode(v, depth + 1) for v in value]
        if not isinstance(value, dict) or len(value) == 0:
            raise WireError(f"unexpected {type(value).__name__} in a message")
        if "__tensor__" in value:
            t = self.tensors.get(value["__tensor__"]) if isinstance(value["__tensor__"], str) else None
            if not isinstance(t, torch.Tensor):
                raise WireError("a message refers to a tensor it does not carry")
            if value.get("complex"):
                t = torch.view_as_complex(t)
            if value.get("requires_grad") and (t.is_floating_point() or t.is_complex()):
                t = t.requires_grad_()
            return t
        if "__dict__" in value:
            pairs = value["__dict__"]
            if not isinstance(pairs, list) or not all(isinstance(p, list) and len(p) == 2 for p in pairs):
                raise WireError("malformed dict in a message")
            out = {}
            for k, v in pairs:
                key = self.decode(k, depth + 1)
                if isinstance(key, (list, dict, set, torch.Tensor)):
                    raise WireError("unhashable dict key in a message")
                out[key] = self.decode(v, depth + 1)
            return out
        if "__tuple__" in value:
            return tuple(self._items(value["__tuple__"], depth))
        if "__set__" in value:
            items = self._items(value["__set__"], depth)
            if any(isinstance(v, (list, dict, set, torch.Tensor)) for v in items):
                raise WireError("unhashable set member in a message")
            return set(items)
        if "__float__" in value:
            text = value["__float__"]
            if text not in ("nan", "inf", "-inf"):
                raise WireError("malformed float in a message")
            return float(text)
        if "__bytes__" in value:
            try:
                return base64.b64decode(value["__bytes__"], validate=True)
            except Exception as exc:  # noqa: BLE001
                raise WireError("malformed bytes in a message") from exc
        if "__size__" in value:
            return torch.Size(self._ints(value["__size__"]))
        if "__dtype__" in value:
            dtype = getattr(torch, str(value["__dtype__"]), None)
            if not isinstance(dtype, torch.dtype):
                raise WireError("unknown dtype in a message")
            return dtype
        if "__device__" in value:
            return torch.device("cpu")
        if "__handle__" in value:
            if self.on_handle is None or not isinstance(value["__handle__"], int):
                raise WireError("unexpected object handle in a message")
            return self.on_handle(value["__handle__"])
        if "__construct__" in value:
            if self.on_construct is None:
                raise WireError("unexpected Construct in a message")
            args, kwargs = self.decode(value["args"], depth + 1), self.decode(value["kwargs"], depth + 1)
            if not isinstance(args, list) or not isinstance(kwargs, dict):
                raise WireError("malformed Construct in a message")
            return self.on_construct(Construct(value["__construct__"], *args, method=value.get("method"), **kwargs))
        if "__callback__" in value:
            if self.on_callback is None or not isinstance(value["__callback__"], int):
                raise WireError("unexpected Callback in a message")
            return self.on_callback(value["__callback__"])
        raise WireError("unknown marker in a message")

    def _items(self, items: Any, depth: int) -> list[Any]:
        if not isinstance(items, list):
            raise WireError("malformed sequence in a message")
        return [self.decode(v, depth + 1) for v in items]

    @staticmethod
    def _ints(items: Any) -> list[int]:
        if not isinstance(items, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise WireError("malformed size in a message")
        return items


def pack(header: dict[str, Any], tensors: dict[str, torch.Tensor]) -> bytes:
    """One message: lengths, the JSON header, the safetensors blob."""
    head = json.dumps(header).encode()
    blob = _st_save(tensors) if tensors else b""
    return _HEADER.pack(len(head), len(blob)) + head + blob


def read_exact(fd: int, n: int, read: Callable[[int, int], bytes]) -> bytes:
    chunks, got = [], 0
    while got < n:
        chunk = read(fd, min(n - got, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the channel")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def unpack_lengths(prefix: bytes, max_bytes: int) -> tuple[int, int]:
    n_head, n_blob = _HEADER.unpack(prefix)
    if n_head > max_bytes or n_blob > max_bytes or n_head + n_blob > max_bytes:
        raise WireError(f"message of {n_head + n_blob} bytes is over the limit of {max_bytes}")
    return n_head, n_blob


def unpack_body(head: bytes, blob: bytes) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    try:
        header = json.loads(head)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WireError("malformed message header") from exc
    if not isinstance(header, dict):
        raise WireError("malformed message header")
    try:
        tensors = _st_load(blob) if blob else {}
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise WireError(f"malformed tensor data: {exc}") from exc
    return header, tensors


HEADER_SIZE = _HEADER.size
