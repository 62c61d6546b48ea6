"""The shape of a Llama model, and conversion to and from Hugging Face ``config.json``.

One small dataclass holds every number that decides a Llama architecture. Everything else
(the head size, the KV-cache size, the parameter count) is derived from it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from llama_from_scratch.feed_forward import llama_hidden_dim
from llama_from_scratch.rope import _validate_scaling


@dataclass
class LlamaConfig:
    """Hyper-parameters of a Llama model (defaults: Llama 2 7B's shape).

    Attributes:
        vocab_size: number of token ids.
        dim: model width (Hugging Face: ``hidden_size``).
        n_layers: number of transformer blocks (``num_hidden_layers``).
        n_heads: query heads per attention layer (``num_attention_heads``).
        n_kv_heads: key/value heads (``num_key_value_heads``); None means ``n_heads`` (MHA).
        hidden_dim: SwiGLU hidden width (``intermediate_size``); None means
            :func:`~llama_from_scratch.feed_forward.llama_hidden_dim` of ``dim``.
        norm_eps: RMSNorm epsilon (``rms_norm_eps``).
        rope_theta: RoPE base.
        rope_scaling: None or a Hugging Face rope scaling dict (e.g. ``{"rope_type": "llama3", ...}``).
        max_seq_len: longest sequence the model accepts (``max_position_embeddings``).
        tie_embeddings: whether the output layer shares the token-embedding matrix
            (``tie_word_embeddings``).
    """

    model_type: ClassVar[str] = "llama"  # Hugging Face's name of the architecture (PEFT reads it)

    vocab_size: int = 32000
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int | None = None
    hidden_dim: int | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_seq_len: int = 2048
    tie_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.hidden_dim is None:
            self.hidden_dim = llama_hidden_dim(self.dim)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "hidden_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LlamaConfig.{name} must be a positive integer, got {value!r}")
        if self.dim % self.n_heads != 0:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads != 0:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"head_dim = dim / n_heads = {self.head_dim} must be even for RoPE")
        if not self.norm_eps > 0:
            raise ValueError(f"norm_eps must be positive, got {self.norm_eps}")
        if not self.rope_theta > 0:
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            # Hugging Face 5 keeps rope_theta inside the dict; here it has its own field.
            self.rope_scaling.pop("rope_theta", None)
            if self.rope_scaling.get("rope_type", self.rope_scaling.get("type")) in (None, "default"):
                self.rope_scaling = None
        _validate_scaling(self.rope_scaling, self.rope_theta)

    @property
    def head_dim(self) -> int:
        """Size of one attention head: ``dim // n_heads``."""
        return self.dim // self.n_heads

    # ----- presets ------------------------------------------------------------------------------

    @classmethod
    def smollm2_135m(cls) -> LlamaConfig:
        """SmolLM2-135M (and -Instruct): 30 layers, width 576, 9 query / 3 key-value heads."""
        return cls(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536,
                   norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None, max_seq_len=8192,
                   tie_embeddings=True)

    @classmethod
    def llama32_1b(cls) -> LlamaConfig:
        """Llama 3.2 1B: 16 layers, width 2048, 32 query / 8 key-value heads, llama3 RoPE scaling."""
        return cls(vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192,
                   norm_eps=1e-5, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                   max_seq_len=131072, tie_embeddings=True)

    @classmethod
    def tiny(cls, **overrides: Any) -> LlamaConfig:
        """A tiny model for tests and quick experiments (GQA, tied embeddings); override any field."""
        fields = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=160,
                      norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_seq_len=128,
                      tie_embeddings=True)
        fields.update(overrides)
        return cls(**fields)

    # ----- Hugging Face conversion --------------------------------------------------------------

    @classmethod
    def from_hf(cls, dict_or_path: dict[str, Any] | str | Path) -> LlamaConfig:
        """Reads a Hugging Face Llama config: a dict, a ``config.json`` path, or a model folder.

        Understands both ``rope_parameters`` (transformers 5) and ``rope_scaling`` + ``rope_theta``
        (transformers 4). Raises ``ValueError`` for features this package does not implement
        (biases, other activations, a head size other than ``hidden_size / num_attention_heads``).
        """
        if isinstance(dict_or_path, dict):
            hf = dict_or_path
        else:
            path = Path(dict_or_path)
            if path.is_dir():
                path = path / "config.json"
            if not path.is_file():
                raise FileNotFoundError(f"no Hugging Face config found at {path}")
            hf = json.loads(path.read_text())

        required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"]
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"Hugging Face config lacks required keys {missing}")
        model_type = hf.get("model_type", "llama")
        if model_type != "llama":
            raise ValueError(f"expected model_type 'llama', got {model_type!r}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"only hidden_act 'silu' (SwiGLU) is supported, got {hf['hidden_act']!r}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag, False):
                raise ValueError(f"{flag}=True is not supported by this package's Llama")

        rope = hf.get("rope_parameters") or hf.get("rope_scaling")
        rope = dict(rope) if rope else None
        theta = hf.get("rope_theta")
        if theta is None and rope is not None:
            theta = rope.get("rope_theta")
        theta = 10000.0 if theta is None else float(theta)

        config = cls(
            vocab_size=hf["vocab_size"],
            dim=hf["hidden_size"],
            n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"],
            n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            hidden_dim=hf["intermediate_size"],
            norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=rope,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        )
        head_dim = hf.get("head_dim")
        if head_dim is not None and head_dim != config.head_dim:
            raise ValueError(
                f"head_dim={head_dim} differs from hidden_size / num_attention_heads = {config.head_dim}; "
                "this package derives head_dim and does not support that"
            )
        return config

    def to_hf(self) -> dict[str, Any]:
        """The equivalent Hugging Face ``LlamaConfig`` dict (``transformers.LlamaConfig(**d)`` works).

        Both spellings of the RoPE settings are written: ``rope_theta`` + ``rope_scaling``
        (transformers 4) and ``rope_parameters`` (transformers 5).
        """
        rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope_parameters = {**copy.deepcopy(self.rope_scaling), "rope_theta": self.rope_theta}
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.dim,
            "intermediate_size": self.hidden_dim,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": copy.deepcopy(self.rope_scaling),
            "rope_parameters": rope_parameters,
            "max_position_embeddings": self.max_seq_len,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": 0.02,
        }

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict (``LlamaConfig(**config.to_dict())`` rebuilds it)."""
        return asdict(self)
