"""`alignkit push`: a model, or a LoRA adapter, to a Hugging Face Hub repository.

What goes up: the weights (full, or the adapter's), the config and tokenizer files, a model
card (README.md) and the training curves. The card is the dir's own alignkit card, else one
rendered from its training record, else a minimal one; its metadata is checked here, with
no network, the way the Hub checks it (a `base_model` that is a local path is left out: the
Hub takes only repository ids there). Everything goes up in one commit, so a repository
never holds half a push. `--dry-run` lists the files and checks the card, offline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from alignkit import rundir
from alignkit.card import BUNDLED, minimal_card, model_card
from alignkit.errors import AlignkitError
from alignkit.models import DEFAULT_MODEL_NAMES, adapter_base, resolve

TEXT_KEYS = ("license", "library_name", "pipeline_tag")  # required, each a string


@dataclass(frozen=True)
class Upload:
    """One file of a push: its path in the repository and its local file or its bytes."""

    path_in_repo: str
    source: Path | bytes

    @property
    def size(self) -> int:
        return len(self.source) if isinstance(self.source, bytes) else self.source.stat().st_size


@dataclass
class PushPlan:
    repo_id: str
    model_dir: Path
    adapter: bool
    uploads: list[Upload]
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- what goes up


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise AlignkitError(f"--repo-id '{repo_id}' is not a Hub repository id: {exc}") from None
    if "/" not in repo_id:
        raise AlignkitError(f"--repo-id '{repo_id}' needs its owner: USER/NAME or ORG/NAME.")


def model_dir(spec: str) -> tuple[Path, bool]:
    """The local dir a model spec names, and whether it is a LoRA adapter dir."""
    resolved = resolve(spec)
    if resolved.adapter:
        return Path(resolved.adapter), True
    path = Path(resolved.path)
    if not path.is_dir():
        raise AlignkitError(
            f"'{spec}' is not a model on this machine; push takes a local model, run or adapter "
            "dir (or `default`)."
        )
    return path, False


def weight_files(directory: Path, adapter: bool) -> list[Path]:
    """The dir's model files; an error when it holds no weights to push."""
    files = rundir.model_files(directory, adapter)
    names = {p.name for p in files}
    config = rundir.ADAPTER_CONFIG if adapter else rundir.MODEL_CONFIG
    if config not in names or not any(n.endswith(".safetensors") for n in names):
        raise AlignkitError(
            f"'{directory}' holds no {'adapter' if adapter else 'model'} weights ({config} and "
            "safetensors files). Pass the output dir of alignkit sft, pref or merge."
        )
    return files


def is_hub_id(name: str) -> bool:
    """Whether a name can be a Hub repository id (not a local path)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name.startswith((".", "/", "~")) or Path(name).expanduser().exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def base_of(spec: str, directory: Path, adapter: bool) -> tuple[str | None, str | None]:
    """The base model (hub id) and license a card without a training record names."""
    if spec in DEFAULT_MODEL_NAMES:
        return BUNDLED["hub_id"], BUNDLED["license"]
    if adapter:
        base = adapter_base(directory / rundir.ADAPTER_CONFIG)
        return (base if is_hub_id(base) else None), None
    return None, None


def card_text(spec: str, directory: Path, adapter: bool, repo_id: str) -> str:
    """The README to push: an alignkit card of the dir, or a minimal one."""
    text = model_card(directory, repo_id)  # the name its usage code loads
    if text is None:
        base, license_ = base_of(spec, directory, adapter)
        text = minimal_card(repo_id, base, license_, "peft" if adapter else "transformers")
    return text


# ---------------------------------------------------------------- card metadata


def hub_card(text: str, adapter: bool) -> tuple[str, list[str]]:
    """The card with the metadata the Hub needs (library_name; base_model only as hub ids),
    and notes on what was changed."""
    from huggingface_hub import ModelCard

    card = ModelCard(text)  # raises ValueError (or a YAML error) on metadata that does not parse
    data, notes = card.data, []
    if not data.library_name:
        data.library_name = "peft" if adapter else "transformers"
    bases = [data.base_model] if isinstance(data.base_model, str) else data.base_model or []
    local = [b for b in bases if not (isinstance(b, str) and is_hub_id(b))]
    if local:
        kept = [b for b in bases if b not in local]
        data.base_model = kept[0] if len(kept) == 1 else kept or None
        notes.append(
            f"card: base_model {', '.join(map(str, local))} is not a Hub id (a local path?), "
            "so the metadata leaves it out"
        )
    return str(card), notes


def card_problems(text: str) -> list[str]:
    """What the Hub would refuse in a card's metadata, checked without the network: it
    parses, the required keys are strings, tags and datasets are lists of strings,
    base_model holds hub ids, and every model-index entry is well formed."""
    from huggingface_hub import ModelCard

    try:
        data = ModelCard(text).data  # parses model-index into eval results, or raises
    except (ValueError, yaml.YAMLError) as exc:
        return [f"metadata does not parse: {exc}"]
    meta = data.to_dict()
    problems = [f"{k} must be a non-empty string" for k in TEXT_KEYS if not _text(meta.get(k))]
    for key in ("tags", "datasets"):
        value = meta.get(key)
        if value is not None and not (isinstance(value, list) and all(map(_text, value))):
            problems.append(f"{key} must be a list of strings")
    if not meta.get("tags"):
        problems.append("tags must list at least one tag")
    bases = meta.get("base_model")
    for base in [bases] if isinstance(bases, str) else bases or []:
        if not (isinstance(base, str) and is_hub_id(base)):
            problems.append(f"base_model '{base}' is not a Hub model id")
    for result in data.eval_results or []:
        if not isinstance(result.metric_value, (int, float)):
            problems.append(f"model-index: {result.dataset_name} has a non-numeric value")
    return problems


def _text(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def ready_card(text: str, adapter: bool, directory: Path) -> tuple[str, list[str]]:
    """The card to push and notes on what changed; an error naming what the Hub would
    refuse in it."""
    try:
        text, notes = hub_card(text, adapter)
        problems = card_problems(text)
    except (ValueError, yaml.YAMLError) as exc:
        notes, problems = [], [f"metadata does not parse: {exc}"]
    if problems:
        raise AlignkitError(
            f"The model card for '{directory}' has metadata the Hub would refuse: "
            f"{'; '.join(problems)}. Fix the card (alignkit card writes a valid one) and push again."
        )
    return text, notes


# ---------------------------------------------------------------- the plan


def plan_push(spec: str, repo_id: str, card: Path | None = None) -> PushPlan:
    """What a push of `spec` to `repo_id` uploads; errors for a bad id, a dir with no
    weights or a card the Hub would refuse. `card` replaces the dir's own card."""
    check_repo_id(repo_id)
    directory, adapter = model_dir(spec)
    files = weight_files(directory, adapter)
    text = (
        card.read_text(encoding="utf-8") if card else card_text(spec, directory, adapter, repo_id)
    )
    text, notes = ready_card(text, adapter, directory)
    uploads = [Upload(p.name, p) for p in files]
    if adapter:
        uploads, renamed = hub_base(uploads, card_base(text))
        notes += renamed
    uploads.append(Upload(rundir.CARD, text.encode("utf-8")))
    if (directory / rundir.CURVES).is_file():
        uploads.append(Upload(rundir.CURVES, directory / rundir.CURVES))
    return PushPlan(repo_id, directory, adapter, uploads, notes)


def card_base(text: str) -> str | None:
    from huggingface_hub import ModelCard

    base = ModelCard(text).data.base_model
    return base if isinstance(base, str) else None


def hub_base(uploads: list[Upload], base: str | None) -> tuple[list[Upload], list[str]]:
    """The uploads with an adapter config that names its base by Hub id (the card's) where
    it names a local path (the converted default model, say), so peft loads it from the Hub."""
    config = next(u for u in uploads if u.path_in_repo == rundir.ADAPTER_CONFIG)
    data = json.loads(config.source.read_text(encoding="utf-8"))
    named = data.get("base_model_name_or_path")
    if base is None or not isinstance(named, str) or is_hub_id(named):
        return uploads, []
    data["base_model_name_or_path"] = base
    fixed = Upload(rundir.ADAPTER_CONFIG, json.dumps(data, indent=2).encode("utf-8"))
    note = f"{rundir.ADAPTER_CONFIG}: base model '{named}' is local; it goes up as '{base}'"
    return [fixed if u is config else u for u in uploads], [note]


def human_size(size: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return ""


def describe_plan(plan: PushPlan, private: bool, revision: str | None) -> str:
    """The files a push sends, with their sizes, and where to."""
    what = "adapter" if plan.adapter else "model"
    visibility = "private" if private else "public"
    lines = [
        f"{what} {plan.model_dir} -> {plan.repo_id} ({visibility}, revision {revision or 'main'})"
    ]
    width = max(len(u.path_in_repo) for u in plan.uploads)
    lines += [f"  {u.path_in_repo:<{width}}  {human_size(u.size):>9}" for u in plan.uploads]
    total = sum(u.size for u in plan.uploads)
    lines.append(f"  {len(plan.uploads)} files, {human_size(total)}; card metadata valid")
    return "\n".join(lines + plan.notes)


# ---------------------------------------------------------------- the upload


def hub_error(exc: Exception, endpoint: str) -> AlignkitError:
    """What a failed Hub call means for the user, and what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return AlignkitError(
            "Cannot push: Hugging Face offline mode is on (HF_HUB_OFFLINE). Unset it and run "
            "again; nothing was uploaded."
        )
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return AlignkitError(
            f"The Hub refused the token ({status}): log in with a token that can write to the "
            "repository (`hf auth login`, or set HF_TOKEN), then run again."
        )
    if isinstance(exc, HfHubHTTPError) and status is not None:
        first = str(exc).strip().splitlines()[0]
        return AlignkitError(f"The Hub refused the push ({first}); nothing was uploaded.")
    return AlignkitError(
        f"Could not reach the Hugging Face Hub at {endpoint} ({type(exc).__name__}). Check the "
        "network connection (and HF_ENDPOINT, if set), then run again; nothing was uploaded. "
        "`alignkit push --dry-run` checks a push without the network."
    )


def upload(plan: PushPlan, private: bool, revision: str | None) -> str:
    """Create the repository (and branch) if needed and upload the plan in one commit;
    the commit's URL."""
    from huggingface_hub import CommitOperationAdd, HfApi, get_token

    if get_token() is None:
        raise AlignkitError(
            "No Hugging Face token is configured: run `hf auth login` or set HF_TOKEN to a token "
            "with write access, then push again."
        )
    api = HfApi()
    operations = [CommitOperationAdd(u.path_in_repo, _fileobj(u.source)) for u in plan.uploads]
    what = "adapter" if plan.adapter else "model"
    try:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        if revision:
            api.create_branch(plan.repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            plan.repo_id,
            operations=operations,
            commit_message=f"Upload {what} with alignkit push",
            revision=revision,
        )
    except Exception as exc:
        if not is_hub_failure(exc):
            raise
        raise hub_error(exc, api.endpoint) from None
    return commit.commit_url


def is_hub_failure(exc: Exception) -> bool:
    """An error of the Hub or of the way to it: huggingface_hub's HTTP errors and offline
    mode are OSErrors; a refused or timed-out connection is an error of the HTTP library
    huggingface_hub uses (httpx, or httpx2 in newer releases)."""
    return isinstance(exc, OSError) or type(exc).__module__.split(".")[0].startswith("httpx")


def _fileobj(source: Path | bytes) -> str | bytes:
    return source if isinstance(source, bytes) else str(source)


def push(
    spec: str,
    repo_id: str,
    private: bool = False,
    revision: str | None = None,
    dry_run: bool = False,
    card: Path | None = None,
    say: Callable[[str], None] = print,
) -> str | None:
    """Push the model `spec` names to `repo_id` (or with `dry_run` only describe the push);
    the commit URL."""
    plan = plan_push(spec, repo_id, card)
    say(describe_plan(plan, private, revision))
    if dry_run:
        say("dry run: nothing was uploaded")
        return None
    url = upload(plan, private, revision)
    say(f"pushed to {url}")
    return url
