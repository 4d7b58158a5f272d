"""Re-host the SPM authors' model zoo (SD v1.x membranes on Google Drive) as one Hub repo, once.

    python scripts/publish_zoo.py --out outputs/zoo                      # fetch, check, write files and cards
    python scripts/publish_zoo.py --out outputs/zoo --upload --token hf_...   # ... and upload

Every registry entry with a Drive id is fetched (gdown), read as a membrane (a safetensors file; a
pickle only through `torch.load(weights_only=True)`), checked to have the SD 1.x layout, and written in
the reference format with our metadata (concepts, base model, surrogate, recommended scale and
transport) beside a model card with the paper's citation and the licence. The repo is the registry's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path

from diffusers_spm.architectures import detect_architecture
from diffusers_spm.hub import RegistryEntry, download_from_drive, membrane_model_card, registry
from diffusers_spm.membrane import Membrane, MembraneFormatError

logger = logging.getLogger("publish_zoo")

RECOMMENDED = {"scale": 1.0, "transport": {"metric": "clipcos_tokenuni", "power": 2.0}}  # the paper's settings
CITATION = """@inproceedings{lyu2024onedimensional,
  title={One-dimensional Adapter to Rule Them All: Concepts, Diffusion Models and Erasing Applications},
  author={Lyu, Mengyao and Yang, Yuhong and Hong, Haiwen and Chen, Hui and Jin, Xuan and He, Yuan and Xue, Hui and Han, Jungong and Ding, Guiguang},
  booktitle={CVPR},
  year={2024}
}"""
# The authors' repository (github.com/Con6924/SPM) has no licence file; the maintainer confirms the terms
# with them before uploading and passes them with --license / --license-note.
DEFAULT_LICENSE = "other"
DEFAULT_LICENSE_NOTE = ("Trained and published by the SPM authors (github.com/Con6924/SPM), whose repository names no "
                        "licence; re-hosted unchanged in weights for convenience. Ask the authors before other uses.")


def read_download(path: Path) -> Membrane:
    """A downloaded file as a membrane: safetensors, or a pickle read with `weights_only=True` (no code runs)."""
    with path.open("rb") as handle:
        is_pickle = handle.read(2) in (b"PK", b"\x80\x02", b"\x80\x04")  # torch's zip, or a bare pickle
    return Membrane.from_pickle(path) if is_pickle else Membrane.from_file(path)


def prepare(entry: RegistryEntry, downloaded: Path) -> Membrane:
    """The authors' membrane with our metadata; refuses anything that is not an SD 1.x membrane."""
    membrane = read_download(downloaded)
    architecture = detect_architecture(membrane)
    if architecture != "sd1":
        raise MembraneFormatError(f"{entry.name}: the Drive file has the {architecture} layout, not SD 1.x.")
    surrogate = entry.description.removeprefix("Surrogate: ") if entry.description.startswith("Surrogate: ") else None
    return dataclasses.replace(
        membrane, concepts=list(entry.concepts), surrogate=surrogate, base_model=entry.base_model,
        architecture=architecture,
        extra_metadata={**membrane.extra_metadata, "spm_recommended": json.dumps(RECOMMENDED),
                        "spm_source": f"https://drive.google.com/file/d/{entry.drive_id}"},
    )


def model_card(entry: RegistryEntry, membrane: Membrane, license_id: str, license_note: str) -> str:
    """The package's card for the file, with the recommended settings, the source, the citation and the licence."""
    card = membrane_model_card(membrane, filename=entry.filename, repo_id=entry.repo_id)
    card = card.replace("library_name: diffusers", f"library_name: diffusers\nlicense: {license_id}", 1)
    transport = RECOMMENDED["transport"]
    return card + "\n".join([
        "", "## Recommended settings", "",
        f"`pipe.load_spm(\"{entry.name}\")`, scale {RECOMMENDED['scale']:g}, "
        f"`pipe.set_spm_transport(True, metric=\"{transport['metric']}\", power={transport['power']:g})`.",
        "", "## Source and licence", "",
        f"Trained by the SPM authors; original file: https://drive.google.com/file/d/{entry.drive_id} "
        "(linked from the model zoo of github.com/Con6924/SPM).", "", license_note,
        "", "## Citation", "", "```bibtex", CITATION, "```", "",
    ])


def publish(out: Path, names: list[str] | None = None, license_id: str = DEFAULT_LICENSE,
            license_note: str = DEFAULT_LICENSE_NOTE) -> dict[str, Path]:
    """Fetch, check and write every membrane and its card into `out`; returns the files by short name."""
    entries = [e for e in registry().values() if e.drive_id and (names is None or e.name in names)]
    written = {}
    for entry in entries:
        downloaded = out / "downloads" / f"{entry.name}.download"
        if not downloaded.exists():
            downloaded.parent.mkdir(parents=True, exist_ok=True)
            download_from_drive(entry.drive_id, downloaded)
        membrane = prepare(entry, downloaded)
        written[entry.name] = membrane.save(out / "repo" / entry.filename)
        (out / "repo" / f"{Path(entry.filename).stem}.md").write_text(model_card(entry, membrane, license_id, license_note))
        logger.info("%s: %d layers, %s", entry.name, len(membrane.modules), written[entry.name])
    return written


def upload(folder: Path, repo_id: str, token: str | None = None) -> str:
    """Create the repo and upload the membranes and cards (a README indexes them)."""
    from huggingface_hub import HfApi

    index = ["# SPM membranes for SD v1.x (the authors' model zoo)", "",
             "Load one with `pipe.load_spm(\"<name>\")` from diffusers-spm; each has its own card:", ""]
    index += [f"- [{card.stem}]({card.name})" for card in sorted(folder.glob("*.md")) if card.name != "README.md"]
    index += ["", "## Citation", "", "```bibtex", CITATION, "```", ""]
    (folder / "README.md").write_text("\n".join(index))
    api = HfApi(token=token)
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=str(folder), repo_id=repo_id, commit_message="The SPM authors' SD v1.x model zoo")
    return f"https://huggingface.co/{repo_id}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/zoo"))
    parser.add_argument("--only", nargs="+", help="short names (default: every registry entry with a Drive id)")
    parser.add_argument("--license", default=DEFAULT_LICENSE, help="the model card's licence id")
    parser.add_argument("--license-note", default=DEFAULT_LICENSE_NOTE)
    parser.add_argument("--upload", action="store_true", help="upload to the registry's Hub repo")
    parser.add_argument("--token", help="Hub token (default: the logged-in one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = publish(args.out, args.only, args.license, args.license_note)
    if args.upload:
        repos = {registry()[name].repo_id for name in files}
        for repo_id in sorted(repos):
            logger.info("uploaded: %s", upload(args.out / "repo", repo_id, args.token))


if __name__ == "__main__":
    main()
