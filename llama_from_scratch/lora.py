"""LoRA: low-rank adapters for fine-tuning (Hu et al. 2021), from scratch (chapter 10).

Fine-tuning changes a pretrained weight ``W`` (``[out, in]``) by some ``dW``. LoRA's bet is that
``dW`` has low rank, so it trains ``dW = B @ A`` with ``A`` ``[r, in]`` and ``B`` ``[out, r]``,
``r`` small (8), and keeps ``W`` frozen:

    y = W x + (alpha / r) * B (A x)

``B`` starts at zero, so the adapted model starts exactly equal to the pretrained one; ``A``
starts random (``kaiming_uniform_(a=sqrt(5))``, nn.Linear's default). Only ``r * (in + out)``
numbers per layer are trained instead of ``in * out``, which shrinks gradients and optimizer
state, and after training ``B @ A`` can be merged into ``W`` (:func:`merge_lora`) so inference
costs nothing extra.

Names and semantics follow Hugging Face PEFT (``lora_A``, ``lora_B``, ``scaling = lora_alpha /
r``, dropout only on the LoRA branch, target matching by module-name suffix), so the tests can
check outputs, merged weights and parameter counts against ``peft.get_peft_model``.

The base layer may also be a :class:`~llama_from_scratch.quantization.LinearNF4`: a frozen
4-bit base with float adapters is QLoRA (chapter 11).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from llama_from_scratch.quantization import LinearNF4

__all__ = ["LoRALinear", "apply_lora", "count_parameters", "lora_parameters", "merge_lora"]

#: ``apply_lora(model, target_modules=ALL_LINEAR)`` targets every linear layer except the output
#: layer, as PEFT's ``target_modules="all-linear"`` does.
ALL_LINEAR = "all-linear"


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: ``base(x) + B(A(dropout(x))) * alpha / r``.

    Args:
        base: the layer to adapt, an ``nn.Linear`` or a :class:`LinearNF4` (QLoRA). Its
            parameters are frozen (``requires_grad=False``).
        r: rank of the update (> 0).
        alpha: scale numerator; ``scaling = alpha / r``. Keeping ``alpha`` fixed while changing
            ``r`` keeps the update's size roughly constant (PEFT's ``lora_alpha``).
        dropout: dropout probability applied to the input of the LoRA branch only (the base
            layer sees ``x`` unchanged), as in PEFT.

    Submodules: ``base``, ``lora_A`` (``nn.Linear(in, r, bias=False)``), ``lora_B``
    (``nn.Linear(r, out, bias=False)``, zeros), ``lora_dropout``. The adapters get the base
    weight's dtype and device (a :class:`LinearNF4` base: its ``compute_dtype``).
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 8, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, (nn.Linear, LinearNF4)):
            raise TypeError(f"LoRALinear wraps an nn.Linear or a LinearNF4, got {type(base).__name__}")
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.r = r
        self.alpha = alpha
        self.scaling = alpha / r
        if isinstance(base, LinearNF4):
            dtype, device = base.compute_dtype, base.weight_packed.device
        else:
            dtype, device = base.weight.dtype, base.weight.device
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """PEFT's initialization: A ~ kaiming_uniform(a=sqrt(5)), B = 0, so the update starts at 0."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        return result + (self.lora_B(self.lora_A(lora_x)) * self.scaling).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update ``(B @ A) * scaling`` (``[out, in]``) in the adapters' dtype. 16-bit adapters
        are multiplied in float32 and cast back, as PEFT does on CPU; float32/float64 ones as they are."""
        a, b = self.lora_A.weight, self.lora_B.weight
        compute = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
        return ((b.to(compute) @ a.to(compute)) * self.scaling).to(a.dtype)

    def merged_linear(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing the same function (without dropout): ``W + (B @ A) * scaling``.

        With a :class:`LinearNF4` base the weight is first dequantized to ``compute_dtype``: the
        result is a float layer (the merged weight is not re-quantized, which would add a
        second rounding error; quantize it again with ``LinearNF4`` if memory matters).
        """
        base = self.base
        if isinstance(base, LinearNF4):
            weight = base.dequantize_weight()
        else:
            weight = base.weight.detach()
        merged = nn.Linear(self.in_features, self.out_features, bias=base.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            merged.weight.copy_(weight + self.delta_weight().to(weight.dtype))
            if base.bias is not None:
                merged.bias.copy_(base.bias.detach().to(weight.dtype))
        return merged

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}"


def _matches(name: str, targets: Sequence[str]) -> bool:
    """PEFT's list matching: the module name equals a target or ends with ``"." + target``."""
    return any(name == t or name.endswith("." + t) for t in targets)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def _output_layer_names(model: nn.Module) -> set[str]:
    """Names of the output projection, which PEFT's "all-linear" leaves out."""
    names = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else getattr(model, "lm_head", None)
    for name, module in model.named_modules():
        if out is not None and module is out:
            names.add(name)
    return names


def apply_lora(model: nn.Module, target_modules: Sequence[str] | str = ("q_proj", "v_proj"), r: int = 8,
               alpha: float = 8, dropout: float = 0.0) -> nn.Module:
    """Wraps the targeted linear layers of ``model`` in :class:`LoRALinear` (in place) and freezes
    every other parameter, so that only the adapters train. Returns ``model``.

    Args:
        target_modules: module names, matched as PEFT matches a list: a module is targeted when
            its full name (``model.layers.0.self_attn.q_proj``) equals an entry or ends with
            ``"." + entry`` (``"q_proj"``, ``"self_attn.q_proj"``, ``"layers.0.mlp.up_proj"``).
            The string ``"all-linear"`` targets every ``nn.Linear`` / ``LinearNF4`` except the
            output layer (``lm_head``), like PEFT's. Any other single string is taken as one
            name (PEFT would read it as a regular expression).
        r, alpha, dropout: as in :class:`LoRALinear`.

    Raises:
        ValueError: nothing matched (the message lists the targets and some module names).
        TypeError: a matched module is not a linear layer (e.g. an attention block or an
            embedding), or is already a LoRALinear.
    """
    all_linear = target_modules == ALL_LINEAR
    if isinstance(target_modules, str) and not all_linear:
        target_modules = (target_modules,)
    if not all_linear:
        target_modules = tuple(target_modules)
        if not target_modules:
            raise ValueError("target_modules is empty: name at least one module (e.g. 'q_proj')")

    if all_linear:
        skip = _output_layer_names(model)
        targets = [name for name, m in model.named_modules()
                   if isinstance(m, (nn.Linear, LinearNF4)) and name not in skip]
    else:
        targets = [name for name, _ in model.named_modules() if name and _matches(name, target_modules)]
    if not targets:
        names = [name for name, _ in model.named_modules() if name]
        raise ValueError(f"no module of {type(model).__name__} matches target_modules={target_modules!r}; "
                         f"module names look like {names[:8]}")

    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        module = model.get_submodule(name)
        if isinstance(module, LoRALinear):
            raise TypeError(f"module {name!r} already has LoRA; merge_lora(model) first")
        if not isinstance(module, (nn.Linear, LinearNF4)):
            raise TypeError(f"target {name!r} is a {type(module).__name__}; LoRA adapts nn.Linear "
                            f"(or LinearNF4) layers only")
        _set_submodule(model, name, LoRALinear(module, r=r, alpha=alpha, dropout=dropout))
    return model


def merge_lora(model: nn.Module) -> nn.Module:
    """Replaces every :class:`LoRALinear` of ``model`` (in place) by a plain ``nn.Linear`` whose
    weight is ``W + (B @ A) * scaling``; the model then computes the same function (without the
    LoRA dropout) at the original cost. A QLoRA layer (NF4 base) becomes a float ``nn.Linear``
    with the dequantized weight plus the update (see :meth:`LoRALinear.merged_linear`).
    The merged weights are frozen, as the base was. Returns ``model``.
    """
    if isinstance(model, LoRALinear):
        raise TypeError("merge_lora needs the model containing the LoRALinear; use layer.merged_linear()")
    names = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        merged = model.get_submodule(name).merged_linear()
        merged.requires_grad_(False)
        _set_submodule(model, name, merged)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A`` / ``lora_B`` weights of every :class:`LoRALinear` in ``model``."""
    return [p for m in model.modules() if isinstance(m, LoRALinear)
            for p in (m.lora_A.weight, m.lora_B.weight)]


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (a tied tensor counts once).

    ``trainable_only=True`` counts those with ``requires_grad``. The NF4 weights of a
    :class:`LinearNF4` are buffers, not parameters, but they are counted in the total as the
    number of values they hold (``in * out``), as PEFT counts bitsandbytes' 4-bit weights, so a
    QLoRA model reports the size of the model it represents.
    """
    total = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if not trainable_only:
        total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, LinearNF4))
    return total
