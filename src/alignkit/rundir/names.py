"""The run directory's file names and the paths built from them."""

from __future__ import annotations

from pathlib import Path

ROOT = "runs"  # default parent of every command's output dir

# training outputs
CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
RUN_INFO = "run_info.json"
CURVES = "training_curves.png"
TENSORBOARD = "tensorboard"
MERGE_INFO = "merge_info.json"
CARD = "README.md"
LOG = "log.txt"  # third-party logging, warnings and progress bars; alignkit's own lines

# checkpoints
CHECKPOINT_PREFIX = "checkpoint-"
CHECKPOINT_STATE = "state.json"  # the loop position, written last: a checkpoint is complete
CHECKPOINT_RNG_STATE = "rng-{rank}.json"  # each process's Python and NumPy RNG
CHECKPOINT_RNG_TENSORS = "rng-{rank}.safetensors"  # each process's torch RNG
# Accelerate's names inside a checkpoint (accelerate.utils.constants): DDP / one process
# weights, and the RNG pickle `save_state` writes per process, which alignkit replaces
ACCELERATE_WEIGHTS = "model.safetensors"
ACCELERATE_RNG = "random_states_{rank}.pkl"
# text files DeepSpeed writes beside its shards (its tag, its offline converter)
CHECKPOINT_TEXT_FILES = ("latest", "zero_to_fp32.py")

# eval outputs
RESULTS = "results.json"
SAMPLES = "samples"
TABLE = "comparison.md"
CHART = "comparison.png"

# workflow run dirs
RECIPE = "recipe.yaml"
SUMMARY = "summary.md"
STATE_DIR = ".state"
PREVIOUS = ".previous"

# what travels from an adapter run into the merged model made from it
TRAINING_RECORD = (CONFIG, METRICS, RUN_INFO, CURVES)

# model files (transformers' and peft's names): what `alignkit push` uploads of a model dir
MODEL_CONFIG = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
MODEL_FILES = (MODEL_CONFIG, "generation_config.json", "*.safetensors", "*.safetensors.index.json")
ADAPTER_FILES = (ADAPTER_CONFIG, "adapter_model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

# ship outputs (workflow push and export stages)
PUSH_INFO = "push.json"


def default_dir(command: str) -> Path:
    """Where a command writes when no output dir is given: runs/<command>."""
    return Path(ROOT) / command


def checkpoint_dir(directory: Path, step: int) -> Path:
    return directory / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_rng_files(checkpoint: Path, rank: int) -> tuple[Path, Path]:
    """One process's RNG files in a checkpoint: (JSON states, torch tensors)."""
    return (
        checkpoint / CHECKPOINT_RNG_STATE.format(rank=rank),
        checkpoint / CHECKPOINT_RNG_TENSORS.format(rank=rank),
    )


def accelerate_rng_file(checkpoint: Path, rank: int) -> Path:
    return checkpoint / ACCELERATE_RNG.format(rank=rank)


def checkpoint_step(path: Path) -> int:
    return int(path.name.removeprefix(CHECKPOINT_PREFIX))


def checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary dirs are never listed)."""
    found = [p for p in directory.glob(f"{CHECKPOINT_PREFIX}*") if (p / CHECKPOINT_STATE).is_file()]
    return sorted(found, key=checkpoint_step)


def state_file(run_dir: Path, stage_id: str) -> Path:
    return run_dir / STATE_DIR / f"{stage_id}.json"


def gguf_name(kind: str) -> str:
    """The GGUF file a workflow export stage writes, by weight type."""
    return f"model-{kind}.gguf"


def model_files(directory: Path, adapter: bool) -> list[Path]:
    """A model dir's weight, config and tokenizer files (top level only: never a
    checkpoint), sorted by name."""
    patterns = (ADAPTER_FILES if adapter else MODEL_FILES) + TOKENIZER_FILES
    found = {p for pattern in patterns for p in directory.glob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.name)
