"""scripts/publish_zoo.py without the network: Drive and the Hub API are replaced by fakes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from diffusers_spm import Membrane, MembraneFormatError
from diffusers_spm.architectures import meta_unet, unet_config
from diffusers_spm.hub import registry
from reference_spm import random_membrane

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "publish_zoo.py"


@pytest.fixture(scope="module")
def publish_zoo():
    spec = importlib.util.spec_from_file_location("publish_zoo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sd1_membrane() -> Membrane:
    return random_membrane(meta_unet(unet_config("sd1")), ["authors' prompt"], seed=0)


def serve(monkeypatch, publish_zoo, files: dict[str, callable]) -> list[str]:
    """Drive as a dict of drive id -> writer; returns the ids asked for."""
    asked = []

    def download(drive_id, output):
        asked.append(drive_id)
        files[drive_id](Path(output))
    monkeypatch.setattr(publish_zoo, "download_from_drive", download)
    return asked


def test_safetensors_and_pickle_become_membranes_with_metadata_and_cards(monkeypatch, tmp_path, publish_zoo, sd1_membrane):
    snoopy, joker = registry()["snoopy"], registry()["joker"]
    asked = serve(monkeypatch, publish_zoo, {
        snoopy.drive_id: lambda out: sd1_membrane.save(out.with_suffix(".safetensors")).rename(out),
        joker.drive_id: lambda out: torch.save(sd1_membrane.state_dict(), out),  # a .pt: read weights_only
    })
    files = publish_zoo.publish(tmp_path, ["snoopy", "joker"])
    assert sorted(files) == ["joker", "snoopy"] and sorted(asked) == sorted([snoopy.drive_id, joker.drive_id])
    written = Membrane.from_file(files["joker"])
    assert written.concepts == ["joker"] and written.surrogate == "Heath Ledger"
    assert written.base_model == "CompVis/stable-diffusion-v1-4" and written.architecture == "sd1"
    name = next(iter(sd1_membrane.modules))
    assert torch.equal(written.modules[name].down, sd1_membrane.modules[name].down)
    with safe_open(str(files["snoopy"]), framework="pt") as handle:
        meta = handle.metadata()
    assert json.loads(meta["spm_recommended"]) == {"scale": 1.0, "transport": {"metric": "clipcos_tokenuni", "power": 2.0}}
    assert meta["spm_source"].endswith(snoopy.drive_id) and "spm_surrogate" not in meta
    card = (tmp_path / "repo" / "snoopy.md").read_text()
    assert "license: other" in card and "lyu2024onedimensional" in card and "names no licence" in card
    assert f"https://drive.google.com/file/d/{snoopy.drive_id}" in card and 'pipe.load_spm("snoopy")' in card
    publish_zoo.publish(tmp_path, ["snoopy"])  # a second run reuses the download
    assert len(asked) == 2


def test_a_file_without_the_sd1_layout_is_refused(monkeypatch, tmp_path, publish_zoo):
    from conftest import tiny_pipeline

    cat = registry()["cat"]
    serve(monkeypatch, publish_zoo, {cat.drive_id: lambda out: random_membrane(tiny_pipeline().unet, ["cat"], 0)
                                     .save(out.with_suffix(".safetensors")).rename(out)})
    with pytest.raises(MembraneFormatError, match="match none of sd1"):
        publish_zoo.publish(tmp_path, ["cat"])
    assert not (tmp_path / "repo" / cat.filename).exists()


def test_upload_writes_an_index_and_uploads_the_folder(monkeypatch, tmp_path, publish_zoo):
    import huggingface_hub

    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("token", token))

        def create_repo(self, repo_id, exist_ok):
            calls.append(("create", repo_id, exist_ok))

        def upload_folder(self, folder_path, repo_id, commit_message):
            calls.append(("upload", folder_path, repo_id))
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    (tmp_path / "snoopy.md").write_text("card")
    url = publish_zoo.upload(tmp_path, "org/zoo", token="t")
    assert url == "https://huggingface.co/org/zoo"
    assert calls == [("token", "t"), ("create", "org/zoo", True), ("upload", str(tmp_path), "org/zoo")]
    assert "- [snoopy](snoopy.md)" in (tmp_path / "README.md").read_text()
