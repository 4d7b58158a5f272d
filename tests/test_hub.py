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


# ---------------------------------------------------------------- the registry's Drive fallback
@pytest.fixture
def online(monkeypatch):
    """The network as seen by the registry: the Hub repo is missing, Drive serves what `served` holds."""
    from diffusers_spm import hub

    calls = {"hub": 0, "drive": 0}
    served = {}

    def hub_missing(repo_id, filename, hub_kwargs):
        calls["hub"] += 1
        raise FileNotFoundError(f"No Hub repo {repo_id!r}.")

    def drive(drive_id, output):
        calls["drive"] += 1
        if drive_id not in served:
            raise OSError("the download failed")
        served[drive_id](output)

    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_download", hub_missing)
    monkeypatch.setattr(hub, "download_from_drive", drive)
    return calls, served


def test_drive_fallback_lands_in_the_hub_cache_layout(pipe, tmp_path, online, monkeypatch):
    from diffusers_spm import hub

    calls, served = online
    entry = registry()["nudity"]
    membrane = random_membrane(pipe.unet, ["nudity"], seed=3)
    served[entry.drive_id] = membrane.save
    path, name = resolve_membrane("nudity", cache_dir=str(tmp_path))
    assert name == "nudity" and calls == {"hub": 1, "drive": 1}
    assert path == tmp_path / f"models--gdrive--{entry.drive_id}" / "snapshots" / entry.drive_id / entry.filename
    assert entry.cached_file(str(tmp_path)) == (path, "drive")
    assert [p.name for p in path.parent.iterdir()] == [entry.filename]  # no temporary file left
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)  # cached: found offline, no download
    pipe.load_spm("nudity", cache_dir=str(tmp_path))
    assert calls == {"hub": 1, "drive": 1} and pipe.get_active_spms() == ["nudity"]
    saved = pipe.save_spm("nudity", tmp_path / "again.safetensors")
    name0 = next(iter(membrane.modules))
    from diffusers_spm import Membrane

    assert torch.equal(Membrane.from_file(saved).modules[name0].up, membrane.modules[name0].up)


def test_drive_pickle_is_never_loaded(pipe, tmp_path, online):
    from diffusers_spm import MembraneFormatError

    calls, served = online
    entry = registry()["snoopy"]
    served[entry.drive_id] = lambda output: torch.save(random_membrane(pipe.unet, ["snoopy"], seed=0).state_dict(), output)
    with pytest.raises(FileNotFoundError, match=r"Google Drive \(file .*\): .*not a readable safetensors file"):
        resolve_membrane("snoopy", cache_dir=str(tmp_path))
    assert entry.cached_file(str(tmp_path)) is None


def test_both_sources_failing_names_them_and_the_local_way(tmp_path, online):
    calls, _ = online
    entry = registry()["van_gogh"]
    with pytest.raises(FileNotFoundError) as info:
        resolve_membrane("van_gogh", cache_dir=str(tmp_path))
    message = str(info.value)
    assert "'van_gogh'" in message and f"the Hub ({entry.repo_id}/{entry.filename})" in message
    assert f"Google Drive (file {entry.drive_id}): the download failed" in message
    assert "pipe.load_spm('path/to/van_gogh.safetensors')" in message and calls == {"hub": 1, "drive": 1}


def test_offline_without_cache_says_so_without_the_network(tmp_path, online, monkeypatch):
    from diffusers_spm import hub

    calls, _ = online
    monkeypatch.setattr(hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(FileNotFoundError, match=r"'cat' is not cached and HF_HUB_OFFLINE=1 forbids downloading it"):
        resolve_membrane("cat", cache_dir=str(tmp_path))
    assert calls == {"hub": 0, "drive": 0}


def test_registry_holds_the_authors_zoo():
    entries = registry()
    assert len(entries) == 15 and all(e.drive_id and len(e.drive_id) == 33 for e in entries.values())
    assert len({e.drive_id for e in entries.values()}) == 15
    assert entries["snoopy"].drive_id == "1_dWwFd3OB4ZLjfayPUoaVP3Fi-OGJ3KW"
