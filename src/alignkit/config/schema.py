"""The recipe schema: typed dataclasses whose field help is the single source for `--help`.

A recipe is YAML whose top-level keys are the sections of `Recipe`. Types are checked
when a recipe is resolved (`config.load`); the rules beyond types live beside this
schema in `config.check`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal


def opt(default: Any = dataclasses.MISSING, help: str = "", factory: Any = None) -> Any:  # noqa: A002
    """A dataclass field carrying its help text (shown by `--help` and in the docs)."""
    if factory is not None:
        return field(default_factory=factory, metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name_or_path: str = opt(
        "default",
        "Model to load: `default` (bundled SmolLM2-135M-Instruct), a hub id, a local "
        "directory (full weights or a LoRA adapter dir) or a .gguf file.",
    )
    revision: str | None = opt(None, "Hub revision (branch, tag or commit) for a hub id.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = opt(
        "auto", "Weight dtype; auto = bfloat16 on a CUDA GPU that supports it, else float32."
    )
    device: str = opt("auto", "Device: auto (CUDA if present, else CPU), cpu, cuda, cuda:N.")
    chat_template: str | None = opt(
        None,
        "Chat template: empty = the tokenizer's own; or chatml, llama2, human_assistant, "
        "alpaca, or a path to a .jinja file.",
    )
    adapter: Literal["none", "lora", "qlora"] = opt(
        "none", "Trainable weights: none (full), lora, or qlora (4-bit NF4 base; CUDA only)."
    )
    trust_remote_code: bool = opt(False, "Allow model code from the hub (transformers flag).")


@dataclass
class LoraConfig:
    r: int = opt(16, "LoRA rank.")
    alpha: int = opt(16, "LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = opt(0.05, "Dropout on the LoRA input.")
    target_modules: list[str] = opt(
        help="Modules to adapt: all-linear, or names such as q_proj,v_proj.",
        factory=lambda: ["all-linear"],
    )


@dataclass
class DataSource:
    path: str = opt(
        help="A local json/jsonl/parquet/csv file (optionally .gz) or a hub dataset id."
    )
    format: str = opt("auto", "Record format; auto detects it from the first rows.")
    split: str = opt("train", "Split, with optional slicing such as train[:1000].")
    name: str | None = opt(None, "Hub dataset configuration name.")
    weight: float = opt(
        1.0, "Fraction of this source's rows to use in a mixture (above 1 repeats rows)."
    )

    @classmethod
    def from_string(cls, text: str) -> DataSource:
        return cls(path=text)


@dataclass
class DataConfig:
    sources: list[DataSource] = opt(
        help="Training data: one or more sources (a path string or a list of mappings).",
        factory=list,
    )
    eval_sources: list[DataSource] = opt(
        help="Held-out eval data from separate sources (instead of train.eval_fraction).",
        factory=list,
    )
    max_length: int = opt(1024, "Longest tokenized example (prompt + completion) kept.")
    max_prompt_length: int | None = opt(
        None,
        "Prompt tokens kept at least when an example must be truncated; empty = max_length / 2.",
    )
    truncation: Literal["truncate_prompt_left", "drop"] = opt(
        "truncate_prompt_left",
        "Too-long examples: keep the BOS token, the system turn and the end of the prompt (then "
        "cut the completion's end), or drop.",
    )
    train_on_prompt: bool = opt(False, "Train on every token, not only the assistant turns.")
    strict: bool = opt(False, "Make skipped rows (empty text, chosen == rejected) an error.")
    seed: int = opt(42, "Seed for mixing and shuffling sources.")
    num_proc: int | None = opt(
        None,
        "Processes that tokenize the data (once, on the main process; the others and later "
        "runs read its cache under $ALIGNKIT_CACHE/tokenized); empty = every CPU core this "
        "process may use, at most 16.",
    )


@dataclass
class TrainConfig:
    output_dir: str | None = opt(
        None, "Where the run's weights, config, metrics and plots go; empty = runs/<command>."
    )
    overwrite: bool = opt(
        False, "Allow writing into a non-empty output_dir (its files may be replaced)."
    )
    epochs: int = opt(1, "Passes over the training data (ignored when max_steps > 0).")
    max_steps: int = opt(0, "Optimizer steps to run; 0 = as many as `epochs` needs.")
    micro_batch_size: int = opt(4, "Examples (or packed rows) per forward pass on each process.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches per optimizer step.")
    learning_rate: float = opt(2e-4, "Peak learning rate (AdamW).")
    scheduler: Literal["cosine", "linear", "constant"] = opt(
        "cosine", "Learning-rate decay after warmup."
    )
    warmup_ratio: float = opt(0.0, "Fraction of the steps spent warming up linearly from 0.")
    warmup_steps: int = opt(0, "Warmup steps; when above 0 it replaces warmup_ratio.")
    weight_decay: float = opt(0.0, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Clip the gradient norm to this; 0 = no clipping.")
    seed: int = opt(42, "Seed for initialisation, data order and dropout.")
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward to save memory.")
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = opt(
        "auto",
        "Autocast precision; auto = bf16 on a GPU that supports it, else none (fp32). bf16 also "
        "runs on CPU (faster than fp32 where the CPU has AVX512-BF16 or AMX); fp16 needs a GPU.",
    )
    packing: bool = opt(
        False, "Put several examples in one row without padding (attention kept inside each)."
    )
    padding_free: bool = opt(
        True,
        "Run each micro-batch as one row with no padding, attention kept inside each "
        "sequence (computed sequence by sequence).",
    )
    logps_chunk: int = opt(
        128,
        "Score labels from the final hidden states, this many tokens at a time, with no "
        "[batch, seq, vocab] float32 logits; 0 = take the model's full logits.",
    )
    logging_steps: int = opt(1, "Log metrics every N optimizer steps.")
    eval_fraction: float = opt(0.0, "Hold out this fraction of the data for eval loss.")
    eval_steps: int = opt(
        0, "Compute eval loss every N steps (and at the end); 0 = only at the end."
    )
    eval_on_start: bool = opt(False, "Also evaluate before the first step (the 'before' figures).")
    save_steps: int = opt(0, "Write a checkpoint every N steps; 0 = only at the end.")
    save_total_limit: int = opt(2, "Keep the last K checkpoints.")
    resume: Literal["no", "auto"] = opt(
        "no", "auto = continue from the newest complete checkpoint."
    )
    report_to: Literal["none", "tensorboard", "wandb"] = opt(
        "none", "Also log to TensorBoard or W&B."
    )


@dataclass
class PrefConfig:
    loss: list[str] = opt(
        help="Preference loss(es), e.g. sigmoid (DPO), apo_zero, ipo, simpo, orpo, kto; "
        "several comma-separated losses are summed with loss_weights.",
        factory=lambda: ["sigmoid"],
    )
    loss_weights: list[float] = opt(help="One weight per loss; empty = 1 for each.", factory=list)
    beta: float = opt(0.1, "Beta: strength of the tie to the reference (lambda for ORPO).")
    label_smoothing: float = opt(
        0.0, "Assumed label noise eps (robust, exo_pair, aot, simpo, cpo)."
    )
    rpo_alpha: float = opt(0.0, "Add the chosen completions' NLL with this weight (RPO); 0 = off.")
    discopop_tau: float = opt(0.05, "DiscoPOP temperature tau.")
    simpo_gamma: float = opt(0.5, "SimPO target reward margin gamma.")
    cpo_alpha: float = opt(1.0, "Weight of the NLL term in CPO.")
    desirable_weight: float = opt(1.0, "KTO weight of desirable examples.")
    undesirable_weight: float = opt(1.0, "KTO weight of undesirable examples.")
    ref_model: str | None = opt(
        None,
        "Reference model for full-weight training; empty = a frozen copy of the starting "
        "model (with LoRA: the same model with its adapter switched off).",
    )
    precompute_ref: bool = opt(
        False,
        "Compute reference log-probs once before training and cache them on disk, keyed "
        "by reference weights, model config and tokenized data (reused by later runs).",
    )
    share_prompt: bool = opt(
        True,
        "With train.padding_free: compute each pair's prompt once, chosen and rejected "
        "both attending to it.",
    )
    disable_dropout: bool = opt(
        True, "Switch dropout off so policy and reference log-probs are comparable (as TRL)."
    )


@dataclass
class OnlineConfig:
    algorithm: Literal["grpo", "online_dpo"] = opt(
        "grpo",
        "On-policy method: grpo (group-normalised advantages, clipped ratio) or online_dpo "
        "(best vs worst of the k samples as a pair, trained with pref.loss).",
    )
    num_generations: int = opt(4, "Completions sampled per prompt each step (k; TRL's name).")
    max_completion_length: int = opt(64, "Most tokens sampled per completion.")
    temperature: float = opt(1.0, "Sampling temperature (above 0).")
    top_p: float = opt(1.0, "Nucleus sampling probability mass.")
    top_k: int = opt(0, "Sample among the k most likely tokens; 0 = no limit.")
    rewards: list[str] = opt(
        help="Reward functions, summed with reward_weights: ifeval (the prompt's instruction "
        "checks), gsm8k (final number equals the row's answer), length (words beyond "
        "length_target, negative), model:DIR (a trained reward model), or a user function "
        "as module.path:function.",
        factory=lambda: ["ifeval"],
    )
    reward_weights: list[float] = opt(
        help="One weight per reward function; empty = 1 for each.", factory=list
    )
    length_target: int = opt(100, "Words a completion may use before the length reward falls.")
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = opt(
        "dapo",
        "GRPO token averaging (TRL's names): grpo = mean per sequence, then over sequences; "
        "bnpo = over the micro-batch's tokens; dapo = over the step's tokens; dr_grpo = sum "
        "over (sequences x max_completion_length).",
    )
    scale_rewards: Literal["group", "batch", "none"] = opt(
        "group",
        "Divide advantages by the reward std of the group, of the whole batch, or not at all "
        "(Dr. GRPO).",
    )
    beta: float = opt(0.0, "GRPO KL coefficient to the reference (k3 estimator); 0 = no KL term.")
    epsilon: float = opt(0.2, "GRPO lower clipping bound of the ratio: 1 - epsilon.")
    epsilon_high: float | None = opt(
        None, "GRPO upper clipping bound 1 + epsilon_high (DAPO); empty = epsilon."
    )
    use_vllm: bool = opt(
        False, "Sample with vLLM (needs vllm installed and a CUDA GPU); else transformers."
    )


@dataclass
class RmConfig:
    eval_fraction: float = opt(0.1, "Held-out fraction of the pairs for the eval accuracy.")
    score_file: str | None = opt(
        None, "Where `alignkit rm score` writes the scored rows; empty = FILE.scored.jsonl."
    )


@dataclass
class GenerationConfig:
    max_new_tokens: int = opt(256, "Most tokens generated per answer.")
    temperature: float = opt(0.0, "Sampling temperature; 0 = greedy.")
    top_p: float = opt(1.0, "Nucleus sampling probability mass.")
    top_k: int = opt(0, "Sample among the k most likely tokens; 0 = no limit.")
    repetition_penalty: float = opt(1.0, "Penalty for repeated tokens; 1 = none.")
    seed: int = opt(0, "Random seed for sampling.")


@dataclass
class EvalConfig:
    tasks: list[str] = opt(
        help="Benchmarks: ifeval, gsm8k, mmlu, truthfulqa_mc2, winogrande, arc_challenge, "
        "arc_easy, hellaswag (by default the five the reference model cards report).",
        factory=lambda: ["ifeval", "gsm8k", "mmlu", "truthfulqa_mc2", "winogrande"],
    )
    limit: int | None = opt(
        None, "Items per benchmark as a whole (MMLU: spread over its subjects); empty = all."
    )
    batch_size: str = opt(
        "auto",
        "Sequences per forward pass: a number, or auto (largest that fits on a GPU; on CPU "
        "8 for scoring and 32 for generation).",
    )
    num_fewshot: str | None = opt(
        None,
        "Few-shot examples: N for every task or task=N,task=N; empty = each benchmark's usual count (see README).",
    )
    apply_chat_template: bool | None = opt(
        None,
        "Format prompts with the chat template; empty = only for IFEval (as the reference model cards).",
    )
    max_gen_toks: int | None = opt(
        None, "Cap on generated tokens per answer (IFEval allows 1280); empty = the task's own."
    )
    offline: bool = opt(
        False, "Use the shipped benchmark copies even when the Hugging Face Hub is reachable."
    )
    output_dir: str | None = opt(None, "Where results go; empty = runs/eval.")
    overwrite: bool = opt(False, "Replace earlier results of the same model in output_dir.")


@dataclass
class Recipe:
    model: ModelConfig = opt(help="The model.", factory=ModelConfig)
    lora: LoraConfig = opt(
        help="LoRA settings (when model.adapter is lora or qlora).", factory=LoraConfig
    )
    data: DataConfig = opt(help="Data sources and tokenization.", factory=DataConfig)
    train: TrainConfig = opt(help="Training loop.", factory=TrainConfig)
    pref: PrefConfig = opt(help="Preference optimization.", factory=PrefConfig)
    generation: GenerationConfig = opt(help="Text generation.", factory=GenerationConfig)
    online: OnlineConfig = opt(
        help="On-policy training (alignkit online): sampling, rewards, GRPO / online DPO.",
        factory=OnlineConfig,
    )
    rm: RmConfig = opt(help="Reward model training (alignkit rm).", factory=RmConfig)
    eval: EvalConfig = opt(help="Benchmark evaluation (lm-evaluation-harness).", factory=EvalConfig)
