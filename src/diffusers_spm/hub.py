"""Where membranes come from: local files and folders, Hub repos, and the shipped name registry.

Everything Hub-side goes through `huggingface_hub`, so the local cache and `HF_HUB_OFFLINE=1`
behave as they do for any diffusers download. A registry name has a second source, the authors'
Google Drive file, kept in the same cache layout so that it too is fetched once and found offline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from huggingface_hub import constants, hf_hub_download, snapshot_download, try_to_load_from_cache
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = logging.getLogger(__name__)


DRIVE_CACHE_NAMESPACE = "gdrive"  # Drive files live in the Hub cache as repo `gdrive/<file id>`


@dataclass(frozen=True)
class RegistryEntry:
    """A short name (`"nudity"`) for a membrane on the Hub, with its Google Drive original as fallback."""

    name: str
    repo_id: str
    filename: str
    base_model: str
    concepts: tuple[str, ...]
    description: str = ""
    drive_id: str | None = None

    @property
    def drive_repo_id(self) -> str | None:
        """The Drive file's place in the huggingface_hub cache (revision = the Drive id)."""
        return f"{DRIVE_CACHE_NAMESPACE}/{self.drive_id}" if self.drive_id else None

    def cached_file(self, cache_dir: str | os.PathLike | None = None) -> tuple[Path, str] | None:
        """The locally cached file and the source it came from ("hub" or "drive"), without the network."""
        sources = [("hub", self.repo_id)] + ([("drive", self.drive_repo_id)] if self.drive_repo_id else [])
        for source, repo_id in sources:
            found = try_to_load_from_cache(repo_id, self.filename, cache_dir=cache_dir)
            if isinstance(found, str):
                return Path(found), source
        return None


def registry() -> dict[str, RegistryEntry]:
    """The membranes known by short name, from the registry file shipped in the package."""
    raw = json.loads(resources.files("diffusers_spm").joinpath("registry.json").read_text())
    return {
        name: RegistryEntry(name=name, repo_id=e["repo_id"], filename=e["filename"], base_model=e["base_model"],
                            concepts=tuple(e["concepts"]), description=e.get("description", ""),
                            drive_id=e.get("drive_id"))
        for name, e in raw["membranes"].items()
    }


def resolve_membrane(name_or_path: str | Path, weight_name: str | None = None, **hub_kwargs: Any) -> tuple[Path, str]:
    """Find the membrane file for a path, folder, registry short name or Hub repo id.

    Returns the local file and the default adapter name (the file's stem, or the short name).
    """
    candidate = Path(name_or_path)
    if candidate.is_file():
        return candidate, candidate.stem
    if candidate.is_dir():
        file = _pick_weight_file(candidate, weight_name, str(candidate))
        return file, file.stem
    text = str(name_or_path)
    known = registry()
    if text in known:
        return fetch_registered(known[text], hub_kwargs), text
    if "/" not in text or text.startswith((".", "/", "~")) or text.endswith(".safetensors"):
        raise FileNotFoundError(
            f"No membrane at {text!r}: it is not a file, a folder, a Hub repo id ('org/name') or a known short name. "
            f"Known short names: {', '.join(sorted(known))}."
        )
    if weight_name is not None:
        file = _download(text, weight_name, hub_kwargs)
    else:
        file = _pick_weight_file(Path(_snapshot(text, hub_kwargs)), None, text)
    return file, file.stem


def _pick_weight_file(folder: Path, weight_name: str | None, label: str) -> Path:
    if weight_name is not None:
        file = folder / weight_name
        if not file.is_file():
            raise FileNotFoundError(f"{label} has no file {weight_name!r}.")
        return file
    files = sorted(folder.rglob("*.safetensors"))
    if len(files) != 1:
        found = ", ".join(str(f.relative_to(folder)) for f in files) or "none"
        raise FileNotFoundError(
            f"{label} holds {len(files)} .safetensors files ({found}); pass `weight_name=` to pick one."
        )
    return files[0]


@contextlib.contextmanager
def _hub_errors(repo_id: str, filename: str | None) -> Iterator[None]:
    """Translate huggingface_hub's errors into ones that say what to do."""
    what = f"{repo_id}/{filename}" if filename else repo_id
    try:
        yield
    except LocalEntryNotFoundError as exc:
        raise FileNotFoundError(
            f"Membrane {what!r} is not in the local Hugging Face cache and the Hub cannot be reached (offline mode "
            f"or no network). Download it once while online (`hf download {repo_id}"
            f"{' ' + filename if filename else ''}`), or pass a local path."
        ) from exc
    except RepositoryNotFoundError as exc:
        raise FileNotFoundError(f"No Hub repo {repo_id!r} (or it is private: log in with `hf auth login`).") from exc
    except (EntryNotFoundError, RevisionNotFoundError) as exc:
        raise FileNotFoundError(f"The Hub repo {repo_id!r} has no {filename or 'such revision'!r}.") from exc
    except HFValidationError as exc:
        raise FileNotFoundError(f"{repo_id!r} is neither a local path nor a valid Hub repo id.") from exc


def fetch_registered(entry: RegistryEntry, hub_kwargs: dict[str, Any]) -> Path:
    """The registry file: from the cache, else the Hub repo, else the Drive original (checked as safetensors).

    Offline, only the cache is looked at; when nothing works the error names every source tried.
    """
    cache_dir = hub_kwargs.get("cache_dir")
    cached = entry.cached_file(cache_dir)
    if cached is not None:
        return cached[0]
    tried = [f"the Hub ({entry.repo_id}/{entry.filename})"]
    if entry.drive_id:
        tried.append(f"Google Drive (file {entry.drive_id})")
    local = f"or load a local copy: `pipe.load_spm('path/to/{entry.filename}')`."
    if constants.HF_HUB_OFFLINE:
        raise FileNotFoundError(
            f"Membrane {entry.name!r} is not cached and HF_HUB_OFFLINE=1 forbids downloading it from "
            f"{' or '.join(tried)}. Run once online, {local}"
        )
    failures = []
    try:
        return _download(entry.repo_id, entry.filename, hub_kwargs)
    except FileNotFoundError as exc:
        failures.append(f"{tried[0]}: {exc}")
    if entry.drive_id:
        try:
            return _download_drive_file(entry, cache_dir)
        except (OSError, ValueError) as exc:
            failures.append(f"{tried[1]}: {exc}")
    raise FileNotFoundError(
        f"Could not get membrane {entry.name!r}; tried {'; '.join(failures)}. Check the network, {local}"
    )


def download_from_drive(drive_id: str, output: Path) -> None:
    """Fetch a public Google Drive file (gdown handles Drive's confirmation pages)."""
    import gdown

    if gdown.download(id=drive_id, output=str(output), quiet=True) is None:
        raise OSError("the download failed (file missing, private, or over Drive's quota)")


def _download_drive_file(entry: RegistryEntry, cache_dir: str | os.PathLike | None) -> Path:
    """Download the Drive original into the huggingface_hub cache layout, once it parses as a membrane.

    The file is read as safetensors only (the authors' trainer writes safetensors); a pickle is never loaded.
    """
    from .membrane import Membrane

    assert entry.drive_id is not None and entry.drive_repo_id is not None
    repo_folder = Path(cache_dir or constants.HF_HUB_CACHE) / f"models--{entry.drive_repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / entry.drive_id
    snapshot.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=snapshot) as tmp:
        download = Path(tmp) / entry.filename
        download_from_drive(entry.drive_id, download)
        Membrane.from_file(download)  # raises MembraneFormatError for anything but a safetensors membrane
        target = snapshot / entry.filename
        os.replace(download, target)
    (repo_folder / "refs").mkdir(exist_ok=True)
    (repo_folder / "refs" / "main").write_text(entry.drive_id)
    logger.info("Fetched %s from Google Drive into %s.", entry.name, target)
    return target


def _download(repo_id: str, filename: str, hub_kwargs: dict[str, Any]) -> Path:
    with _hub_errors(repo_id, filename):
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))


def _snapshot(repo_id: str, hub_kwargs: dict[str, Any]) -> str:
    with _hub_errors(repo_id, None):
        return snapshot_download(repo_id, allow_patterns=["*.safetensors"], **hub_kwargs)


# ---------------------------------------------------------------------- publishing
if TYPE_CHECKING:
    from .membrane import Membrane


def membrane_model_card(membrane: "Membrane", evaluation_summary: str | None = None, filename: str = "membrane.safetensors",
                        repo_id: str | None = None) -> str:
    """A Hub model card (README.md) for `membrane`: what it erases, on which base, how to use it,
    how it was trained, and the evaluation table when there is one."""
    concepts = ", ".join(f"`{c}`" for c in membrane.concepts) or "(not recorded)"
    base = membrane.base_model or "unknown"
    source = repo_id or "path/to/membrane-folder"
    front = ["---", "library_name: diffusers", "tags:", "- stable-diffusion", "- lora", "- concept-erasing",
             "- spm", "- diffusers-spm"]
    if membrane.base_model:
        front.append(f"base_model: {membrane.base_model}")
    front.append("---")
    lines = [
        *front,
        "",
        f"# SPM membrane: erase {concepts}",
        "",
        "A concept-erasing rank-{} *Semi-Permeable Membrane* ([SPM](https://github.com/Con6924/SPM), CVPR 2024) "
        "trained with diffusers-spm. It adapts every Linear/Conv2d layer inside the UNet's "
        "transformer blocks; Facilitated Transport applies it only to prompts near the erased concept.".format(membrane.rank),
        "",
        "| | |",
        "|---|---|",
        f"| Erased concept(s) | {concepts} |",
        f"| Surrogate (neutral) | {('`' + membrane.surrogate + '`') if membrane.surrogate else 'empty prompt'} |",
        f"| Base model | `{base}` |",
        f"| Architecture | {membrane.architecture or 'unknown'} |",
        f"| Rank / alpha | {membrane.rank} / {membrane.alpha:g} |",
        f"| Adapted layers | {len(membrane.modules)} ({membrane.num_parameters():,} parameters) |",
        "",
        "## Usage",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "from diffusers_spm import add_spm_support",
        "",
        f'pipe = add_spm_support(DiffusionPipeline.from_pretrained("{base}", torch_dtype=torch.float16).to("cuda"))',
        f'pipe.load_spm("{source}", weight_name="{filename}")',
        f'image = pipe("a photo of {membrane.concepts[0] if membrane.concepts else "..."}").images[0]',
        "```",
        "",
        "The file is in the reference (kohya) LoRA layout, so SD-WebUI and `pipe.load_lora_weights(...)` also read "
        "it, as a plain LoRA without Facilitated Transport.",
    ]
    if membrane.training_config is not None:
        lines += ["", "## Training configuration", "", "```json", json.dumps(membrane.training_config, indent=2), "```"]
    if evaluation_summary:
        lines += ["", "## Evaluation", "", evaluation_summary.strip()]
    return "\n".join(lines) + "\n"


def push_membrane(path: str | Path, repo_id: str, evaluation_summary: str | None = None, private: bool = False,
                  token: str | None = None, commit_message: str | None = None) -> str:
    """Create `repo_id` (if needed) and upload the membrane file and its generated model card.

    Returns the repo URL.
    """
    from huggingface_hub import HfApi

    from .membrane import Membrane

    path = Path(path)
    membrane = Membrane.from_file(path)
    card = membrane_model_card(membrane, evaluation_summary, filename=path.name, repo_id=repo_id)
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    message = commit_message or f"Upload SPM membrane ({', '.join(membrane.concepts)})"
    api.upload_file(path_or_fileobj=str(path), path_in_repo=path.name, repo_id=repo_id, commit_message=message)
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id, commit_message=message)
    logger.info("Uploaded %s and its model card to %s.", path.name, repo_id)
    return str(url)
