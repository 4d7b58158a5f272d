"""Hub loading through huggingface_hub, from a cache laid out the Hub's way, offline."""

from __future__ import annotations

import pytest
import torch

from diffusers_spm.hub import registry, resolve_membrane
from reference_spm import random_membrane

REVISION = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache, repo_id, files):
    """Lay `files` ({name: Membrane}) out as huggingface_hub's cache does."""
    root = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = root / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(REVISION)
    for name, membrane in files.items():
        membrane.save(snapshot / name)


def test_the_hub_client_itself_is_offline():
    """huggingface_hub reads HF_HUB_OFFLINE once, at import: set too late, these tests could reach the network."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE


def test_repo_id_with_and_without_weight_name(pipe, tmp_path):
    membrane = random_membrane(pipe.unet, ["snoopy"], seed=0)
    cache_repo(tmp_path, "org/snoopy-spm", {"snoopy.safetensors": membrane})
    pipe.load_spm("org/snoopy-spm", weight_name="snoopy.safetensors", cache_dir=str(tmp_path))
    assert pipe.get_active_spms() == ["snoopy"]
    pipe.unload_spm()
    pipe.load_spm("org/snoopy-spm", cache_dir=str(tmp_path), adapter_name="from_snapshot")
    assert pipe.get_active_spms() == ["from_snapshot"]
    saved = pipe.save_spm("from_snapshot", tmp_path / "out.safetensors")
    from diffusers_spm import Membrane

    again = Membrane.from_file(saved)
    name = next(iter(membrane.modules))
    assert torch.equal(again.modules[name].down, membrane.modules[name].down)


def test_several_files_need_a_weight_name(pipe, tmp_path):
    cache_repo(tmp_path, "org/zoo", {
        "a.safetensors": random_membrane(pipe.unet, ["a"], seed=0),
        "b.safetensors": random_membrane(pipe.unet, ["b"], seed=1),
    })
    with pytest.raises(FileNotFoundError, match=r"holds 2 .safetensors files \(a.safetensors, b.safetensors\); pass `weight_name=`"):
        pipe.load_spm("org/zoo", cache_dir=str(tmp_path))
    pipe.load_spm("org/zoo", weight_name="b.safetensors", cache_dir=str(tmp_path))
    assert pipe.get_active_spms() == ["b"]


def test_registry_short_name_resolves_through_the_hub_cache(pipe, tmp_path):
    entry = registry()["nudity"]
    assert entry.concepts == ("nudity",) and entry.base_model == "CompVis/stable-diffusion-v1-4"
    cache_repo(tmp_path, entry.repo_id, {entry.filename: random_membrane(pipe.unet, ["nudity"], seed=0)})
    path, name = resolve_membrane("nudity", cache_dir=str(tmp_path))
    assert name == "nudity" and path.name == entry.filename and REVISION in str(path)
    pipe.load_spm("nudity", cache_dir=str(tmp_path))
    assert pipe.get_active_spms() == ["nudity"]
    assert pipe.get_spm_transport_rates("a nudity scene")["nudity"][0] == pytest.approx(1.0)


def test_local_folder(pipe, tmp_path):
    random_membrane(pipe.unet, ["snoopy"], seed=0).save(tmp_path / "folder" / "snoopy.safetensors")
    pipe.load_spm(tmp_path / "folder")
    assert pipe.get_active_spms() == ["snoopy"]
