"""Tiny random configs of the causal-LM families people fine-tune (no download).

Each entry overrides a family's defaults down to 2 layers of width 64 with a 512-token
vocabulary. Families with sliding-window attention get a window of 6 tokens, shorter
than the test sequences, so the window changes the result and must be honoured.
"""

from __future__ import annotations

from typing import Any

VOCAB = 512
WINDOW = 6
LLAMA_LIKE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
TWO_KINDS = ["sliding_attention", "full_attention"]

FAMILIES: dict[str, dict[str, Any]] = {
    "llama": LLAMA_LIKE,
    "mistral": {**LLAMA_LIKE, "head_dim": 16, "sliding_window": WINDOW},
    "mixtral": {**LLAMA_LIKE, "num_local_experts": 4, "num_experts_per_tok": 2},
    "qwen2": {
        **LLAMA_LIKE,
        "use_sliding_window": True,
        "sliding_window": WINDOW,
        "max_window_layers": 1,
    },
    "qwen2_moe": {**LLAMA_LIKE, **MOE, "num_experts": 4, "shared_expert_intermediate_size": 32},
    "qwen3": {**LLAMA_LIKE, "head_dim": 16},
    "qwen3_moe": {**LLAMA_LIKE, **MOE, "head_dim": 16, "num_experts": 4},
    "qwen3_next": {
        **LLAMA_LIKE,
        **MOE,
        "head_dim": 16,
        "num_experts": 4,
        "shared_expert_intermediate_size": 32,
        "linear_num_key_heads": 2,
        "linear_num_value_heads": 4,
        "linear_key_head_dim": 16,
        "linear_value_head_dim": 16,
        "layer_types": ["linear_attention", "full_attention"],
    },
    "gemma": {**LLAMA_LIKE, "head_dim": 16},
    "gemma2": {**LLAMA_LIKE, "head_dim": 16, "sliding_window": WINDOW},
    "gemma3_text": {
        **LLAMA_LIKE,
        "head_dim": 16,
        "sliding_window": WINDOW,
        "layer_types": TWO_KINDS,
    },
    "phi": {**LLAMA_LIKE, "num_key_value_heads": 4},
    "phi3": {**LLAMA_LIKE, "pad_token_id": 0},
    "olmo2": LLAMA_LIKE,
    "granite": LLAMA_LIKE,
    "cohere": LLAMA_LIKE,
    "starcoder2": {**LLAMA_LIKE, "sliding_window": WINDOW},
    "gpt_neox": {**LLAMA_LIKE, "num_attention_heads": 4},
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256},
    "gptj": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256, "rotary_dim": 8},
    "gpt_neo": {
        "hidden_size": 64,
        "num_layers": 2,
        "num_heads": 4,
        "attention_types": [[["global", "local"], 1]],
        "window_size": WINDOW,
        "max_position_embeddings": 256,
    },
    "falcon": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_kv_heads": 4,
        "new_decoder_architecture": True,
    },
    "gpt_oss": {
        **LLAMA_LIKE,
        "head_dim": 16,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "sliding_window": WINDOW,
        "layer_types": TWO_KINDS,
    },
    "deepseek_v3": {
        **LLAMA_LIKE,
        **MOE,
        "num_key_value_heads": 4,
        "n_routed_experts": 4,
        "n_shared_experts": 1,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "kv_lora_rank": 16,
        "q_lora_rank": 16,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 8,
        "v_head_dim": 16,
    },
}


def tiny_config(family: str, vocab: int = VOCAB) -> Any:
    """The tiny config of `family` (a transformers model type)."""
    from transformers import AutoConfig

    return AutoConfig.for_model(family, vocab_size=vocab, **FAMILIES[family])


def tiny_model(family: str, seed: int = 0, sharpen: float = 4.0, vocab: int = VOCAB) -> Any:
    """A random fp32 model of `family`, its matrices scaled by `sharpen`: small random
    weights give near-uniform outputs that hide differences between two paths."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.mul_(sharpen)
    return model.eval()
