"""Every `alignkit` command in one table: summary, recipe sections, flags, arguments."""

from __future__ import annotations

import argparse

from alignkit.cli.handlers import (
    cmd_card,
    cmd_chat,
    cmd_data_inspect,
    cmd_eval,
    cmd_export,
    cmd_merge,
    cmd_online,
    cmd_pref,
    cmd_push,
    cmd_rm,
    cmd_rm_score,
    cmd_run,
    cmd_serve,
    cmd_sft,
)
from alignkit.cli.spec import Command, Group, arg, field_help, port, positive, source_arg
from alignkit.export import GGUF_TYPES

CONFIG = arg("--config", help="Recipe YAML file; flags and overrides apply on top of it.")
VERBOSE = arg(
    "-v",
    "--verbose",
    action="store_true",
    default=argparse.SUPPRESS,  # given after the command or before it (the global default)
    help="Also show other libraries' logging, warnings and progress bars on the terminal "
    "(a stage always writes them to its log.txt).",
)
MODEL = arg("model.name_or_path", nargs="?", metavar="MODEL", help=field_help("model.name_or_path"))
RUNTIME = ("model.chat_template", "model.dtype", "model.device")
# the flags every training command takes first (those that resume also take train.resume)
TRAINING = (
    "model.name_or_path",
    "model.chat_template",
    "data.max_length",
    "train.output_dir",
    "train.overwrite",
)
SHIPPED = arg(
    "model",
    metavar="MODEL",
    help="A merged model, run or adapter dir, or default (the bundled model).",
)

COMMANDS: tuple[Command | Group, ...] = (
    Group(
        "data",
        "Look at training data.",
        (
            Command(
                "inspect",
                "Detected format, row count, token-length percentiles, truncation counts and a rendered example.",
                cmd_data_inspect,
                sections=("model", "data"),
                keys=(
                    "model.name_or_path",
                    "model.chat_template",
                    "data.max_length",
                    "data.max_prompt_length",
                    "data.truncation",
                    "data.train_on_prompt",
                    "data.strict",
                ),
                args=(
                    arg("path", help="A data file or hub dataset id."),
                    source_arg("format"),
                    source_arg("split"),
                ),
            ),
        ),
    ),
    Command(
        "chat",
        "Chat with a model: interactive (streamed answers, /reset, /system TEXT, /exit) or one-shot with --prompt.",
        cmd_chat,
        sections=("model", "generation"),
        keys=(
            *RUNTIME,
            "generation.max_new_tokens",
            "generation.temperature",
            "generation.top_p",
            "generation.top_k",
            "generation.repetition_penalty",
            "generation.seed",
        ),
        args=(
            MODEL,
            arg("--prompt", help="Answer this one message and exit."),
            arg("--system", help="System message for the conversation."),
        ),
    ),
    Command(
        "sft",
        "Supervised fine-tuning (full weights, LoRA or QLoRA).",
        cmd_sft,
        sections=("model", "lora", "data", "train"),
        keys=(*TRAINING, "train.resume", "data.train_on_prompt", "train.packing"),
    ),
    Command(
        "pref",
        "Preference optimization (DPO, APO, IPO, KTO, ORPO, SimPO, ...) with LoRA, QLoRA or full weights.",
        cmd_pref,
        sections=("model", "lora", "data", "train", "pref"),
        keys=(
            *TRAINING,
            "train.resume",
            "data.max_prompt_length",
            "pref.loss",
            "pref.loss_weights",
            "pref.beta",
            "pref.label_smoothing",
            "pref.rpo_alpha",
            "pref.ref_model",
            "pref.precompute_ref",
        ),
        aliases=("dpo",),
    ),
    Command(
        "online",
        "On-policy training: sample k completions per prompt, score them with rewards, train "
        "with GRPO or online DPO.",
        cmd_online,
        sections=("model", "lora", "data", "train", "online", "pref"),
        keys=(
            *TRAINING,
            "train.resume",
            "online.algorithm",
            "online.num_generations",
            "online.rewards",
            "online.reward_weights",
            "online.loss_type",
            "online.beta",
            "online.temperature",
        ),
    ),
    Group(
        "rm",
        "Reward models: train one on preference pairs, or score a file with one.",
        (
            Command(
                "train",
                "Train a Bradley-Terry reward model (sequence-classification head) on preference pairs.",
                cmd_rm,
                sections=("model", "lora", "data", "train", "rm"),
                keys=(*TRAINING, "rm.eval_fraction"),
            ),
            Command(
                "score",
                "Score a file of prompt/completion rows with a reward model.",
                cmd_rm_score,
                sections=("rm",),
                keys=("rm.score_file",),
                args=(
                    arg(
                        "model",
                        metavar="MODEL",
                        help="A reward model dir (from alignkit rm train).",
                    ),
                    arg("file", metavar="FILE", help="Rows with a prompt and a completion."),
                ),
            ),
        ),
    ),
    Command(
        "merge",
        "Merge a LoRA adapter into its base: plain safetensors weights.",
        cmd_merge,
        description="Merge a LoRA adapter (from sft or pref) into its base model and save full "
        "safetensors weights with the tokenizer and chat template; loads with transformers alone.",
        args=(
            arg("adapter_dir", metavar="ADAPTER_DIR", help="A run's adapter output dir."),
            arg("--out", required=True, help="Directory for the merged model."),
            arg(
                "--dtype",
                default="auto",
                choices=["auto", "float32", "bfloat16", "float16"],
                help="Saved weight dtype; auto = the base checkpoint's dtype.",
            ),
            arg("--overwrite", action="store_true", help="Replace a non-empty --out."),
        ),
    ),
    Command(
        "card",
        "Write a Hugging Face model card from runs' saved artifacts.",
        cmd_card,
        description="Write README.md (model card) from training run dirs, in stage order, "
        "and alignkit eval results; every number comes from those files.",
        args=(
            arg(
                "run_dirs",
                nargs="+",
                metavar="RUN_DIR",
                help="Run dirs, first stage first; the last is the model.",
            ),
            arg(
                "--eval",
                nargs="+",
                metavar="RESULTS",
                help="alignkit eval results.json files or dirs, base model first.",
            ),
            arg("--out", help="Card path; default RUN_DIR/README.md of the last run dir."),
            arg("--name", help="Model name in the card; default the last run dir's name."),
            arg(
                "--overwrite",
                action="store_true",
                help="Replace a README.md alignkit did not write.",
            ),
        ),
    ),
    Command(
        "push",
        "Upload a model or adapter (weights, tokenizer, card, curves) to the Hugging Face Hub.",
        cmd_push,
        description="Upload a model dir, or a LoRA adapter dir as an adapter, to a Hub "
        "repository in one commit: weights, config and tokenizer files, a model card (the "
        "dir's alignkit card, one rendered from its training record, or a minimal one) and "
        "training_curves.png. Needs a token (`hf auth login` or HF_TOKEN).",
        args=(
            SHIPPED,
            arg(
                "--repo-id",
                required=True,
                metavar="USER/NAME",
                help="Hub repository; made if missing.",
            ),
            arg("--private", action="store_true", help="Make a new repository private."),
            arg("--revision", help="Branch to push to (made from main if missing); default main."),
            arg(
                "--dry-run",
                action="store_true",
                help="List the files and sizes and check the card metadata; upload nothing.",
            ),
        ),
    ),
    Command(
        "export",
        "Write a Llama-family model (llama, mistral, qwen2) as a GGUF file for llama.cpp.",
        cmd_export,
        description="Write a model (an adapter merged into its base first) as one GGUF file: "
        "weights, tokenizer and chat template, loadable by llama.cpp and by transformers "
        "(gguf_file=...).",
        args=(
            SHIPPED,
            arg("--gguf", required=True, metavar="OUT.gguf", help="The GGUF file to write."),
            arg(
                "--type",
                default="f16",
                choices=GGUF_TYPES,
                help="Weight type of the matrices (vectors stay f32); q8_0 is 8-bit.",
            ),
            arg("--overwrite", action="store_true", help="Replace an existing OUT.gguf."),
        ),
    ),
    Command(
        "eval",
        "Benchmarks through lm-evaluation-harness (IFEval, GSM8K, MMLU, TruthfulQA, ...), "
        "online or on the shipped offline copies; a comparison table and chart.",
        cmd_eval,
        sections=("model", "eval"),
        keys=(
            *RUNTIME,
            "eval.tasks",
            "eval.limit",
            "eval.batch_size",
            "eval.num_fewshot",
            "eval.apply_chat_template",
            "eval.max_gen_toks",
            "eval.offline",
            "eval.output_dir",
            "eval.overwrite",
        ),
        args=(
            arg(
                "models",
                nargs="*",
                metavar="MODEL",
                help="Models to evaluate, base first: hub id, local or adapter dir, .gguf, default.",
            ),
            arg(
                "--compare",
                nargs="+",
                metavar="DIR",
                help="Re-render the table and chart from saved results (no evaluation).",
            ),
        ),
    ),
    Command(
        "run",
        "Run a workflow recipe's stages (sft, pref, online, merge, eval, card, push, export) in order.",
        cmd_run,
        description="Run the stages a recipe lists, each in its own subdirectory of the run dir; "
        "finished unchanged stages are skipped, an interrupted stage resumes, a changed stage "
        "reruns with everything after it. Overrides: key=value (every stage) or "
        "<stage id>.key=value.",
        args=(
            arg("recipe", metavar="RECIPE", help="Workflow recipe YAML (with `stages`)."),
            arg("--output-dir", help="Run dir; default runs/<recipe name>."),
            arg(
                "--dry-run",
                action="store_true",
                help="Validate the recipe, data, model and LoRA targets; print the plan.",
            ),
            arg("--from", dest="start", metavar="STAGE", help="Rerun from this stage on."),
            arg("--until", metavar="STAGE", help="Stop after this stage."),
        ),
    ),
    Command(
        "serve",
        "Serve a model over an OpenAI-compatible HTTP API (chat, completions, models, health); "
        "concurrent requests decode together in one batch.",
        cmd_serve,
        sections=("model",),
        keys=RUNTIME,
        args=(
            MODEL,
            arg("--host", default="127.0.0.1", help="Address to bind; loopback by default."),
            arg("--port", type=port, default=8000, help="Port to listen on (1 to 65535)."),
            arg(
                "--api-key",
                help="Require Authorization: Bearer KEY on /v1 routes (visible to other users "
                "in the process list: prefer $ALIGNKIT_API_KEY or --api-key-file).",
            ),
            arg("--api-key-file", help="Read the API key from this file."),
            arg("--served-name", help="Model id the API reports; default MODEL."),
            arg(
                "--max-queue",
                type=positive,
                default=16,
                help="Requests waiting or running at once; more are answered 503 with Retry-After.",
            ),
            arg(
                "--max-batch",
                type=positive,
                default=8,
                help="Requests decoded together in one batch (they join between tokens).",
            ),
        ),
    ),
)
