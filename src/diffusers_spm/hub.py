"""Where membranes come from: local files and folders, Hub repos, and the shipped name registry.

Everything Hub-side goes through `huggingface_hub`, so the local cache and `HF_HUB_OFFLINE=1`
behave as they do for any diffusers download.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from huggingface_hub import hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryEntry:
    """A short name (`"nudity"`) for a membrane hosted on the Hub."""

    name: str
    repo_id: str
    filename: str
    base_model: str
    concepts: tuple[str, ...]
    description: str = ""


def registry() -> dict[str, RegistryEntry]:
    """The membranes known by short name, from the registry file shipped in the package."""
    raw = json.loads(resources.files("diffusers_spm").joinpath("registry.json").read_text())
    return {
        name: RegistryEntry(name=name, repo_id=e["repo_id"], filename=e["filename"], base_model=e["base_model"],
                            concepts=tuple(e["concepts"]), description=e.get("description", ""))
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
        entry = known[text]
        return _download(entry.repo_id, weight_name or entry.filename, hub_kwargs), entry.name
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


def _download(repo_id: str, filename: str, hub_kwargs: dict[str, Any]) -> Path:
    with _hub_errors(repo_id, filename):
        return Path(hf_hub_download(repo_id, filename, **hub_kwargs))


def _snapshot(repo_id: str, hub_kwargs: dict[str, Any]) -> str:
    with _hub_errors(repo_id, None):
        return snapshot_download(repo_id, allow_patterns=["*.safetensors"], **hub_kwargs)
