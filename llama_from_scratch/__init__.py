"""llama_from_scratch: LLaMA built, trained, fine-tuned and aligned from scratch in PyTorch.

Each chapter of the textbook adds its names here; every one is tested against the library
practitioners use (tiktoken, torch, transformers, peft, bitsandbytes, TRL's formulas).
"""

from llama_from_scratch.environment import pick_device, quick_mode, seed_everything, supports_bf16

__version__ = "0.1.0"

# --- Chapter 1: tokenization ---
from llama_from_scratch.bpe import GPT4_SPLIT_PATTERN, BPETokenizer, get_stats, merge_pair
from llama_from_scratch.tokenizers import TiktokenTokenizer, get_tiktoken_encoding, load_tokenizer

# --- Chapter 2: cross-entropy ---

# --- Chapters 3-6: the model and real weights ---

# --- Chapter 7: decoding ---
from llama_from_scratch.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    filter_logits,
    min_p_filter,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)
