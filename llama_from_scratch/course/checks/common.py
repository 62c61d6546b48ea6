"""What every chapter's checks share: fresh inputs, comparisons that never print the answer, and
gradients through the student's code whichever process it runs in.

A check receives the student's function (or class). When a teacher or CI grades, that is a proxy
to a sandboxed process: arguments travel there as data, the result comes back as data, and the
comparison happens here, in the grader. So a check

- passes only data (tensors, numbers, strings, lists, tuples, dicts, sets), ``Construct(...)`` for
  objects the student's code needs (a ``torch.nn.Linear``, a transformers model), or ``Callback(fn)``
  for a function of the grader's the student's code may call;
- reads back data, or a handle for a non-data result (an instance of the student's class), whose
  methods it can call (``obj(x)``, ``obj.load_state_dict(sd)``, ``obj.state_dict()``);
- uses ``value_and_grad`` for gradients (a tensor that comes back has no autograd history);
- reports what differed (shape, dtype, where, by how much), never the expected values.
"""

from __future__ import annotations

import functools
import random
from typing import Any, Callable

import torch

from llama_from_scratch.course.wire import Callback, Construct  # noqa: F401 - re-exported for checks


def fresh_generator() -> torch.Generator:
    """A generator seeded anew at every grading run, so a memorised answer cannot pass."""
    return torch.Generator().manual_seed(random.SystemRandom().randrange(2 ** 31))


def fresh_rng() -> random.Random:
    """Python's ``random.Random`` seeded anew at every grading run."""
    return random.Random(random.SystemRandom().randrange(2 ** 63))


def as_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` if it is a tensor, else a failure naming what came back."""
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a torch.Tensor, got {type(value).__name__}")
    return value


def assert_close(got: Any, expected: torch.Tensor, what: str, rtol: float = 1e-5, atol: float = 1e-6,
                 hint: str = "", check_dtype: bool = False) -> None:
    """Fail with shape, dtype, the first index that differs and the largest difference (never the
    expected values themselves) unless ``got`` equals ``expected`` within the tolerances."""
    got = as_tensor(got, what)
    if tuple(got.shape) != tuple(expected.shape):
        raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}".rstrip())
    if check_dtype and got.dtype != expected.dtype:
        raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}. {hint}".rstrip())
    if got.is_complex() != expected.is_complex():
        raise AssertionError(f"{what}: expected a {'complex' if expected.is_complex() else 'real'} tensor. {hint}".rstrip())
    g = got.detach().to(torch.complex128 if expected.is_complex() else torch.float64)
    e = expected.detach().to(g.dtype)
    if expected.numel() == 0:
        return
    g_nan, e_nan = torch.isnan(g), torch.isnan(e)
    bad = g_nan != e_nan
    finite = torch.isfinite(e) & torch.isfinite(g)
    bad |= (torch.isinf(g) | torch.isinf(e)) & ~(g == e) & ~(g_nan | e_nan)
    diff = torch.zeros_like(e.real if e.is_complex() else e)
    diff[finite] = (g[finite] - e[finite]).abs()
    bad |= finite & (diff > atol + rtol * e.abs())
    if bad.any():
        first = tuple(int(i) for i in torch.nonzero(bad)[0]) if bad.dim() else ()
        n_bad = int(bad.sum())
        worst = float(diff.max()) if finite.any() else float("nan")
        extra = ""
        if bool(torch.isnan(g).any()) and not bool(e_nan.any()):
            extra = " Your result contains nan."
        elif bool(torch.isinf(g).any()) and not bool(torch.isinf(e).any()):
            extra = " Your result contains inf (an overflow?)."
        raise AssertionError(f"{what}: {n_bad} of {e.numel()} values differ (first at index {first}, largest "
                             f"difference {worst:.3g}, tolerance rtol={rtol:g}, atol={atol:g}).{extra} {hint}".rstrip())


def assert_equal(got: Any, expected: Any, what: str, hint: str = "") -> None:
    """Exact equality of data (ints, strings, lists, dicts, integer tensors), reported without
    printing the expected value: for sequences, the first position that differs."""
    if isinstance(expected, torch.Tensor):
        got = as_tensor(got, what)
        if tuple(got.shape) != tuple(expected.shape):
            raise AssertionError(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}. {hint}".rstrip())
        if got.dtype != expected.dtype and (got.is_floating_point() != expected.is_floating_point()):
            raise AssertionError(f"{what}: expected dtype {expected.dtype}, got {got.dtype}. {hint}".rstrip())
        same = torch.eq(got.to(expected.dtype), expected)
        if expected.is_floating_point():
            same |= torch.isnan(got.to(expected.dtype)) & torch.isnan(expected)
        if not bool(same.all()):
            first = tuple(int(i) for i in torch.nonzero(~same)[0]) if same.dim() else ()
            raise AssertionError(f"{what}: {int((~same).sum())} of {same.numel()} values differ, the first at "
                                 f"index {first}. {hint}".rstrip())
        return
    if type(got) is not type(expected) and not (isinstance(got, (int, float)) and isinstance(expected, (int, float))
                                                and not isinstance(got, bool)):
        raise AssertionError(f"{what}: expected a {type(expected).__name__}, got {type(got).__name__}. {hint}".rstrip())
    if isinstance(expected, (list, tuple, str, bytes)):
        if len(got) != len(expected):
            raise AssertionError(f"{what}: expected length {len(expected)}, got {len(got)}. {hint}".rstrip())
        for i, (a, b) in enumerate(zip(got, expected)):
            if a != b or type(a) is not type(b) and not (isinstance(a, int) and isinstance(b, int)):
                raise AssertionError(f"{what}: first difference at position {i} (got {a!r}). {hint}".rstrip())
        return
    if isinstance(expected, dict):
        missing = [k for k in expected if k not in got]
        extra = [k for k in got if k not in expected]
        if missing or extra:
            raise AssertionError(f"{what}: {len(missing)} keys missing, {len(extra)} unexpected"
                                 f"{' (e.g. ' + repr(extra[0]) + ')' if extra else ''}. {hint}".rstrip())
        wrong = [k for k in expected if got[k] != expected[k]]
        if wrong:
            raise AssertionError(f"{what}: {len(wrong)} of {len(expected)} values differ, e.g. at key {wrong[0]!r} "
                                 f"(got {got[wrong[0]]!r}). {hint}".rstrip())
        return
    if got != expected:
        raise AssertionError(f"{what}: got {got!r}, which is not the expected value. {hint}".rstrip())


def value_and_grad(fn: Callable, *args: Any, grad_output: torch.Tensor | None = None,
                   **kwargs: Any) -> tuple[torch.Tensor, list[torch.Tensor | None], dict[str, torch.Tensor | None]]:
    """Call ``fn(*args, **kwargs)`` where it lives, backpropagate ``grad_output`` (``None`` for a
    scalar output) and return ``(output, grads of the tensor arguments that require grad, grads of
    fn's parameters by name if fn is a module)``. Works the same on a local function and on the
    grader's proxy of a student's function or object."""
    remote = getattr(fn, "_lfs_value_and_grad", None)
    if remote is not None:
        return remote(args, kwargs, grad_output)
    return local_value_and_grad(fn, args, kwargs, grad_output)


def local_value_and_grad(fn: Callable, args: tuple, kwargs: dict, grad_output: torch.Tensor | None):
    """``value_and_grad`` in this process: the same code the student's process runs for the grader."""
    from llama_from_scratch.course.sandbox_worker import value_and_grad as run

    try:
        return run(fn, tuple(args), kwargs, grad_output)
    except (TypeError, RuntimeError) as exc:
        if str(exc).startswith(("expected a", "the result does not depend")):
            raise AssertionError(str(exc)) from None
        raise


def call_answer(fn: Callable, what: str, *args: Any, **kwargs: Any) -> Any:
    """Call the student's code; an exception becomes a failure that says which call it was."""
    try:
        return fn(*args, **kwargs)
    except (AssertionError, NotImplementedError):
        raise
    except Exception as exc:  # noqa: BLE001 - the student's code may raise anything
        raise AssertionError(f"{what} raised {type(exc).__name__}: {exc}") from None


def load_state(obj: Any, state: dict[str, torch.Tensor], what: str, names_hint: str, shape_hint: str) -> None:
    """``obj.load_state_dict(state)`` (strict): wrong parameter names (``names_hint`` says which are
    right) or shapes (``shape_hint`` says why) fail here."""
    keys = call_answer(obj.state_dict, f"{what}.state_dict()")
    if not isinstance(keys, dict):
        raise AssertionError(f"{what}.state_dict() should return a dict")
    assert_equal(sorted(keys), sorted(state), f"{what}: the names in its state_dict", hint=names_hint)
    for name, tensor in state.items():
        value = keys[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(tensor.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise AssertionError(f"{what}: {name} has shape {shape}, expected {tuple(tensor.shape)} ({shape_hint})")
    call_answer(obj.load_state_dict, f"{what}.load_state_dict(...)", state)


def as_scalar_loss(value: Any, what: str) -> torch.Tensor:
    """``value`` as a 0-d tensor; anything but a one-element tensor fails."""
    if not isinstance(value, torch.Tensor):
        raise AssertionError(f"{what}: expected a scalar torch.Tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise AssertionError(f"{what}: expected a scalar loss, got shape {tuple(value.shape)}")
    return value.reshape(())


@functools.lru_cache(maxsize=None)
def quiet_transformers():
    """The transformers module, its logging set to errors only (the grader's output stays clean)."""
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def seqcls(cfg: dict[str, Any]):
    """A ``transformers.LlamaForSequenceClassification`` built from the ``LlamaConfig`` arguments ``cfg``."""
    import transformers

    return transformers.LlamaForSequenceClassification(transformers.LlamaConfig(**cfg))
