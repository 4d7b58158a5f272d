"""Bad input gets a clear error naming the problem and the fix, and leaves the pipeline unchanged."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

from diffusers_spm import MembraneController, MembraneFormatError
from diffusers_spm.commands import convert
from reference_spm import random_membrane
from test_restore import assert_pristine, snapshot


@pytest.fixture
def guarded(pipe):
    """The pipeline plus a check, after the test, that its UNet is exactly as it was."""
    weights = snapshot(pipe.unet)
    yield pipe
    assert_pristine(pipe.unet, weights)


def test_missing_path(guarded):
    with pytest.raises(FileNotFoundError, match="not a file, a folder, a Hub repo id"):
        guarded.load_spm("no/such/dir/membrane.safetensors")
    with pytest.raises(FileNotFoundError, match="Known short names: .*nudity"):
        guarded.load_spm("not_a_registered_name")
    with pytest.raises(TypeError, match="one membrane per call.*call it once per membrane"):
        guarded.load_spm(["a.safetensors", "b.safetensors"])


def test_pickle_is_refused_but_convert_reads_it(guarded, tmp_path):
    membrane = random_membrane(guarded.unet, ["snoopy"], seed=0)
    pt = tmp_path / "snoopy.pt"
    torch.save(membrane.state_dict(), pt)
    with pytest.raises(MembraneFormatError, match=r"pickle.*diffusers-spm convert"):
        guarded.load_spm(pt)
    out = convert(pt, tmp_path / "snoopy.safetensors", "reference")
    guarded.load_spm(out)
    guarded.unload_spm()


def test_safetensors_that_is_not_a_membrane(guarded, tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"conv_in.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(MembraneFormatError, match="not a LoRA or SPM membrane"):
        guarded.load_spm(path)
    text_lora = tmp_path / "te.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(1, 4),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(4, 1)}, str(text_lora))
    with pytest.raises(MembraneFormatError, match="load_lora_weights"):
        guarded.load_spm(text_lora)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(MembraneFormatError, match="not a readable safetensors"):
        guarded.load_spm(garbage)


def test_architecture_mismatch_names_modules(guarded, tmp_path):
    other = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=48, norm_num_groups=32,
    )
    membrane = random_membrane(other, ["snoopy"], seed=0)
    membrane.architecture = "sdxl"
    membrane.save(tmp_path / "other.safetensors")
    with pytest.raises(MembraneFormatError) as info:
        guarded.load_spm(tmp_path / "other.safetensors")
    message = str(info.value)
    assert "text width 48 (sdxl)" in message and "custom (cross_attention_dim=32)" in message
    assert "have no such module here: lora_unet_down_blocks_0_attentions_0" in message
    assert "other shapes" in message and "attn2_to_k" in message


def test_nan_weights(guarded, tmp_path):
    membrane = random_membrane(guarded.unet, ["snoopy"], seed=0)
    next(iter(membrane.modules.values())).up[0, 0] = float("nan")
    membrane.save(tmp_path / "nan.safetensors")
    with pytest.raises(MembraneFormatError, match="NaN or Inf"):
        guarded.load_spm(tmp_path / "nan.safetensors")


def test_bad_scales_and_names(guarded, tmp_path):
    random_membrane(guarded.unet, ["snoopy"], seed=0).save(tmp_path / "snoopy.safetensors")
    with pytest.raises(ValueError, match="No membranes are loaded"):
        guarded.set_spm_scale(0.5)
    guarded.load_spm(tmp_path / "snoopy.safetensors")
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite number >= 0"):
            guarded.set_spm_scale(bad)
    with pytest.raises(ValueError, match=r"No membrane named 'picasso' is loaded; loaded: \['snoopy'\]"):
        guarded.set_spm_scale({"picasso": 0.5})
    with pytest.raises(ValueError, match="already loaded"):
        guarded.load_spm(tmp_path / "snoopy.safetensors")
    with pytest.raises(ValueError, match="Unknown transport metric"):
        guarded.set_spm_transport(True, metric="cosine")
    assert MembraneController.of(guarded.unet).adapters["snoopy"].scale == 1.0
    guarded.unload_spm()


def test_hub_repo_not_cached_while_offline(guarded, tmp_path):
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        guarded.load_spm("someone/missing-membranes", weight_name="x.safetensors", cache_dir=str(tmp_path))
