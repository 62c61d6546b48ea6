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
from llama_from_scratch.loss import chunked_cross_entropy, cross_entropy, log_softmax, logsumexp, perplexity, softmax

# --- Chapters 3-6: the model and real weights ---
from llama_from_scratch.normalization import LayerNorm, RMSNorm
from llama_from_scratch.feed_forward import SwiGLU, llama_hidden_dim
from llama_from_scratch.rope import (
    apply_rope,
    apply_rope_complex,
    permute_qk_for_rotate_half,
    precompute_freqs_cis,
    precompute_rope,
    rope_inv_freq,
    rotate_half,
    unpermute_qk,
)
from llama_from_scratch.attention import (
    GroupedQueryAttention,
    KVCache,
    attention_scratch,
    build_attention_mask,
    causal_mask,
    kv_cache_bytes_per_token,
    repeat_kv,
)
from llama_from_scratch.config import LlamaConfig
from llama_from_scratch.model import Llama, LlamaBackbone, TransformerBlock
from llama_from_scratch.gguf_reader import GGUFError, GGUFFile, GGUFTensorInfo, dequantize, read_gguf
from llama_from_scratch.weights import find_smollm2_gguf
from llama_from_scratch.smollm2_tokenizer import SmolLM2Tokenizer, load_smollm2_tokenizer, render_chatml
from llama_from_scratch.loading import config_from_gguf, gguf_to_hf_name, llama_from_gguf, load_smollm2
from llama_from_scratch.gguf_writer import hf_to_gguf_name, save_gguf
from llama_from_scratch.hf_export import hf_state_dict, save_pretrained, save_tokenizer, tokenizer_to_hf

# --- Chapter 7: decoding ---
from llama_from_scratch.generation import beam_search, generate
from llama_from_scratch.sampling import (
    apply_repetition_penalty,
    apply_temperature,
    filter_logits,
    min_p_filter,
    sample_next_token,
    top_k_filter,
    top_p_filter,
)

# --- Chapter 8: pretraining ---
from llama_from_scratch.optim import (
    AdamW,
    GaLoreAdamW,
    clip_grad_norm,
    cosine_schedule,
    galore_param_groups,
    optimizer_state_bytes,
    weight_decay_groups,
)
from llama_from_scratch.data import (
    StepSampler,
    TokenBlockDataset,
    load_stories,
    load_token_file,
    make_dataloader,
    pack_tokens,
    synthetic_corpus,
    train_val_split,
)
from llama_from_scratch.packing import (
    document_attention_inputs,
    document_causal_mask,
    document_ids_from_eos,
    document_position_ids,
    pack_documents,
)
from llama_from_scratch.trainer import (
    CheckpointError,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    estimate_flops_per_token,
    estimate_mfu,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    train,
)
from llama_from_scratch.scaling_laws import (
    CHINCHILLA_APPROACH3,
    ChinchillaLaw,
    PowerLaw,
    chinchilla_loss,
    compute_optimal,
    fit_chinchilla,
    fit_power_law,
    non_embedding_params,
)

# --- Chapter 9: instruction tuning ---
from llama_from_scratch.instruct import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    InstructionDataset,
    format_alpaca,
    format_chatml,
    instruction_collate,
    load_instructions,
    sft_loss,
    shift_for_trainer,
    SFTBlocks,
)
from llama_from_scratch.self_instruct import filter_instruction, load_seed_tasks, rouge_l, self_instruct, smollm2_generator
from llama_from_scratch.conversations import (
    ConversationDataset,
    check_conversation,
    few_shot_messages,
    load_conversations,
    render_conversation,
    tokenize_conversation,
)

# --- Chapters 10-11: LoRA, NF4 quantization and QLoRA ---
from llama_from_scratch.lora import LoRALinear, apply_lora, count_parameters, lora_parameters, merge_lora
from llama_from_scratch.prompt_tuning import (
    PrefixCache,
    PrefixEncoder,
    PrefixTuning,
    PromptEmbedding,
    PromptEncoder,
    PromptTuning,
    PTuning,
)
from llama_from_scratch.quantization import (
    NF4_BLOCKSIZES,
    NF4_CODE,
    LinearNF4,
    create_dynamic_map,
    create_normal_map,
    dequantize_absmax_int8,
    dequantize_blockwise_8bit,
    dequantize_nf4,
    double_dequantize,
    double_quantize,
    memory_footprint,
    quantize_absmax_int8,
    quantize_blockwise_8bit,
    quantize_model_nf4,
    quantize_nf4,
)
from llama_from_scratch.asymmetric_quantization import (
    AsymmetricQuantized,
    asymmetric_params,
    dequantize_asymmetric,
    quantize_asymmetric,
)

# --- Chapters 12-13: reward modelling, PPO and DPO ---
from llama_from_scratch.reward import RewardModel, last_token_index, pairwise_accuracy, reward_loss
from llama_from_scratch.reward_variants import (
    LLAMA2_SAFETY_THRESHOLD,
    llama2_combined_reward,
    ranking_loss,
    score_regression_loss,
)
from llama_from_scratch.ppo import (
    AdaptiveKLController,
    FixedKLController,
    compute_gae,
    entropy_from_logits,
    kl_penalized_rewards,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_logprobs,
    value_clipfrac,
    whiten,
)
from llama_from_scratch.dpo import dpo_loss
from llama_from_scratch.preferences import load_preferences, preference_margin, preferences_dir

# --- Chapter 14: rejection sampling and GRPO ---
from llama_from_scratch.arithmetic import (
    HELDOUT_TEMPLATES,
    TRAIN_TEMPLATES,
    arithmetic_reward,
    extract_final_number,
    make_arithmetic_problems,
)
from llama_from_scratch.grpo import (
    GRPOConfig,
    completion_mask_from_eos,
    group_advantages,
    grpo_loss,
    grpo_step,
    kl_k3,
    per_token_logprobs,
    sample_groups,
)
from llama_from_scratch.rejection_sampling import best_of_n, completion_nll, select_best_completions, sft_batch
