"""Membranes in a pipeline: reference equivalence, composition, per-sample transport, transfer."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from conftest import recorded_gates, tiny_pipeline, tiny_unet
from diffusers_spm import Membrane, MembraneController
from diffusers_spm.transport import tokensim, tokenuni
from reference_spm import apply_reference, random_membrane, remove_reference

PROMPTS = ["a photo of snoopy", "a red car on a road", "a painting in the style of van gogh"]


def unet_inputs(pipe, prompts, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(len(prompts), 4, 16, 16, generator=g)
    text = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
    return sample, torch.tensor(10), text


def generate(pipe, prompt, seed=0, **kwargs):
    prompts = [prompt] if isinstance(prompt, str) else prompt
    count = len(prompts) * kwargs.get("num_images_per_prompt", 1)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(count)]
    kwargs.setdefault("num_inference_steps", 3)
    return pipe(prompt, generator=generators, output_type="np", height=32, width=32, **kwargs).images


def save_reference_file(membrane: Membrane, path) -> None:
    """Exactly what the reference writes: its keys and its three metadata entries."""
    tensors = {}
    for name, m in membrane.modules.items():
        tensors[f"{name}.lora_down.weight"] = m.down
        tensors[f"{name}.lora_up.weight"] = m.up
        tensors[f"{name}.alpha"] = torch.tensor(m.alpha)
    save_file(tensors, str(path), metadata={"prompts": ",".join(membrane.concepts), "rank": "1", "alpha": "1.0"})


@pytest.fixture
def snoopy(pipe, tmp_path):
    membrane = random_membrane(pipe.unet, ["snoopy"], seed=1)
    path = tmp_path / "snoopy.safetensors"
    save_reference_file(membrane, path)
    return membrane, path


def test_targets_every_linear_and_conv_in_transformer_blocks(pipe):
    from diffusers_spm.architectures import layout

    sd1 = layout("sd1")
    assert len(sd1) == 192
    assert sum(len(shape) == 4 for _, shape in sd1.values()) == 32
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q" in sd1
    assert "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_0_proj" in sd1
    assert not any("resnets" in name for name in sd1)


def test_reference_file_loads_unchanged_and_saves_back(pipe, snoopy, tmp_path):
    membrane, path = snoopy
    pipe.load_spm(path)
    assert pipe.get_active_spms() == ["snoopy"]
    out = pipe.save_spm("snoopy", tmp_path / "again.safetensors")
    again = Membrane.from_file(out)
    assert again.concepts == ["snoopy"]
    assert set(again.modules) == set(membrane.modules)
    for name, module in membrane.modules.items():
        assert torch.equal(again.modules[name].down, module.down)
        assert torch.equal(again.modules[name].up, module.up)
        assert again.modules[name].alpha == module.alpha


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_transport_off_equals_reference_layer(pipe, snoopy, scale):
    membrane, path = snoopy
    inputs = unet_inputs(pipe, PROMPTS[:2])
    with torch.no_grad():
        base = pipe.unet(*inputs).sample
        layers = apply_reference(pipe.unet, [membrane], multiplier=scale)
        expected = pipe.unet(*inputs).sample
        remove_reference(layers)
        pipe.load_spm(path)
        pipe.set_spm_transport(False)
        pipe.set_spm_scale(scale)
        ours = pipe.unet(*inputs).sample
    assert (expected - base).abs().max() > 1e-3  # the membrane really acts
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_default_transport_reproduces_reference_images(pipe, snoopy):
    """Reference: every tensor times the rate m (effective m^2), whole batch; ours: power 2."""
    membrane, path = snoopy
    prompt = "a red car on a road"
    pipe.load_spm(path)
    rate = pipe.get_spm_transport_rates(prompt)["snoopy"][0]
    ours = generate(pipe, prompt)
    pipe.unload_spm()

    # The reference's own rate: cosine of the flattened embeddings, token overlap, max of the two.
    tokens = lambda t: set(pipe.tokenizer(t, padding="max_length", max_length=77).input_ids) - {49406, 49407}
    embeds = pipe.encode_prompt([prompt, "snoopy"], "cpu", 1, False)[0]
    cos = torch.cosine_similarity(embeds[0].flatten(), embeds[1].flatten(), dim=0).item()
    uni = len(tokens(prompt) & tokens("snoopy")) / len(tokens("snoopy"))
    assert rate == pytest.approx(max(cos, uni), abs=1e-5)
    assert 0.0 < rate < 1.0

    layers = apply_reference(pipe.unet, [membrane], rates=[rate])
    expected = generate(pipe, prompt)
    remove_reference(layers)
    plain = generate(pipe, prompt)
    assert abs(expected - plain).max() > 1e-3
    assert abs(ours - expected).max() < 2e-4


def test_rate_floor_gates_unrelated_prompts_at_the_floor(pipe, snoopy):
    """With `floor`, a prompt rated below it acts as the membrane at scale floor ** power, always on."""
    from diffusers_spm import TransportConfig

    _, path = snoopy
    prompt = "a red car on a road"  # tokenuni rates it 0 against "snoopy"
    pipe.load_spm(path)
    pipe.set_spm_transport(True, metric="tokenuni")
    assert pipe.get_spm_transport_rates(prompt)["snoopy"] == [0.0]
    plain = generate(pipe, prompt)
    pipe.set_spm_transport(TransportConfig(metric="tokenuni", floor=0.5))
    floored = generate(pipe, prompt)
    pipe.set_spm_transport(False)
    pipe.set_spm_scale(0.25)
    always_on = generate(pipe, prompt)
    assert abs(floored - plain).max() > 1e-3
    assert abs(floored - always_on).max() < 1e-5
    assert torch.equal(TransportConfig(floor=0.3).gates(torch.tensor([[0.0, 0.5]]), torch.tensor([1.0, 2.0])),
                       torch.tensor([[0.3 ** 2, 2 * 0.5 ** 2]]))
    with pytest.raises(ValueError, match="floor"):
        TransportConfig(floor=1.5)


def test_composition_is_linear_without_cross_terms(pipe, tmp_path):
    a = random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.2)
    b = random_membrane(pipe.unet, ["van gogh"], seed=2, std=0.2)
    a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")
    inputs = unet_inputs(pipe, PROMPTS[:2])
    with torch.no_grad():
        separate = apply_reference(pipe.unet, [a, b], rates=[0.5, 0.8], combine=False)
        expected = pipe.unet(*inputs).sample
        remove_reference(separate)
        crossed = apply_reference(pipe.unet, [a, b], rates=[0.5 ** 0.5, 0.8 ** 0.5], combine=True)
        with_cross_terms = pipe.unet(*inputs).sample
        remove_reference(crossed)
        pipe.load_spm(tmp_path / "a.safetensors")
        pipe.load_spm(tmp_path / "b.safetensors")
        pipe.set_spm_transport(False)
        pipe.set_spm_scale({"a": 0.5, "b": 0.8})
        ours = pipe.unet(*inputs).sample
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)
    assert (ours - with_cross_terms).abs().max() > 1e-4  # the reference's sum mixes membranes


def test_one_call_with_several_prompts_equals_separate_calls(pipe, tmp_path):
    a = random_membrane(pipe.unet, ["snoopy"], seed=1, std=0.3)
    b = random_membrane(pipe.unet, ["van gogh"], seed=2, std=0.3)
    a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")
    pipe.load_spm(tmp_path / "a.safetensors")
    pipe.load_spm(tmp_path / "b.safetensors")
    rates = pipe.get_spm_transport_rates(PROMPTS)
    assert rates["a"][0] > rates["a"][1] and rates["b"][2] > rates["b"][1]  # rows really differ
    batched = generate(pipe, PROMPTS)
    separate = [generate(pipe, p, seed=i)[0] for i, p in enumerate(PROMPTS)]
    for i in range(len(PROMPTS)):
        assert abs(batched[i] - separate[i]).max() < 1e-4
    pipe.disable_spm()
    base = generate(pipe, PROMPTS)
    assert abs(base - batched).max() > 1e-3


def test_cfg_rows_follow_their_prompt_by_default(pipe, snoopy):
    _, path = snoopy
    pipe.load_spm(path)
    seen = recorded_gates(pipe)
    generate(pipe, ["a photo of snoopy", "a red car"], num_images_per_prompt=2, num_inference_steps=1)
    gates = seen[0][:, 0]
    assert gates.shape == (8,)
    torch.testing.assert_close(gates[:4], gates[4:])  # [uncond rows, cond rows]
    assert gates[4] == gates[5] and gates[6] == gates[7] and gates[4] > gates[6]

    pipe.set_spm_transport(True, cfg_rows="own")
    seen.clear()
    generate(pipe, ["a photo of snoopy", "a red car"], num_images_per_prompt=2, num_inference_steps=1)
    own = seen[0][:, 0]
    rate_empty = pipe.get_spm_transport_rates("")["snoopy"][0]
    torch.testing.assert_close(own[:4], torch.full((4,), rate_empty ** 2))


def test_plain_unet_call_uses_embedding_rates(pipe, snoopy):
    membrane, path = snoopy
    pipe.load_spm(path)
    rates = pipe.get_spm_transport_rates(["a red car"])  # also encodes the concepts
    pipe.set_spm_transport(True, metric="clipcos")
    clip_rate = pipe.get_spm_transport_rates(["a red car"])["snoopy"][0]
    inputs = unet_inputs(pipe, ["a red car"])
    with torch.no_grad():
        ours = pipe.unet(*inputs).sample
        pipe.unload_spm()
        layers = apply_reference(pipe.unet, [membrane], rates=[clip_rate])
        expected = pipe.unet(*inputs).sample
        remove_reference(layers)
    assert rates["snoopy"][0] == pytest.approx(clip_rate)  # no shared tokens: tokenuni is 0
    torch.testing.assert_close(ours, expected, atol=2e-5, rtol=1e-4)


def test_membrane_transfers_to_another_unet_of_the_same_layout(tmp_path):
    source, target = tiny_pipeline(seed=0), tiny_pipeline(seed=7)
    membrane = random_membrane(source.unet, ["snoopy"], seed=3)
    membrane.save(tmp_path / "m.safetensors")
    before = generate(target, "a photo of snoopy")
    target.load_spm(tmp_path / "m.safetensors")
    after = generate(target, "a photo of snoopy")
    assert abs(after - before).max() > 1e-3
    assert any(not torch.equal(a, b) for a, b in zip(source.unet.parameters(), target.unet.parameters()))


def test_fuse_matches_fixed_gates_and_unfuse_is_exact(pipe, snoopy):
    _, path = snoopy
    weights = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pipe.load_spm(path)
    pipe.set_spm_transport(False)
    pipe.set_spm_scale(0.8)
    hooked = generate(pipe, "a photo of snoopy")
    pipe.fuse_spm()
    assert pipe.get_active_spms() == []
    changed = [k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, weights[k])]
    assert len(changed) == 72
    fused = generate(pipe, "a photo of snoopy")
    assert abs(fused - hooked).max() < 1e-4
    pipe.unfuse_spm()
    assert all(torch.equal(v, weights[k]) for k, v in pipe.unet.state_dict().items())
    assert abs(generate(pipe, "a photo of snoopy") - hooked).max() < 1e-4


def test_to_dtype_moves_membranes(pipe, snoopy):
    _, path = snoopy
    pipe.load_spm(path)
    pipe.to(torch.bfloat16)
    controller = MembraneController.of(pipe.unet)
    banks = [bank for _, bank in controller.banks()]
    assert len(banks) == 72 and all(b.down.dtype == torch.bfloat16 and b.up.dtype == torch.bfloat16 for b in banks)
    image = generate(pipe, "a photo of snoopy", num_inference_steps=2)
    assert image.shape == (1, 32, 32, 3) and bool((image >= 0).all() and (image <= 1).all())


def test_unet_state_dict_stays_the_users(pipe, snoopy):
    _, path = snoopy
    keys = set(pipe.unet.state_dict())
    pipe.load_spm(path)
    assert set(pipe.unet.state_dict()) == keys
    pipe.unet.load_state_dict(tiny_unet(seed=4).state_dict(), strict=True)  # e.g. swapping in a fine-tune
    assert pipe.get_active_spms() == ["snoopy"]


def test_eoscos_rates_compare_end_of_text_outputs(pipe, snoopy):
    _, path = snoopy
    pipe.load_spm(path)
    pipe.set_spm_transport(True, metric="eoscos")
    prompts = ["a red car on a road", "a photo of snoopy"]
    rates = pipe.get_spm_transport_rates(prompts)["snoopy"]
    embeds = pipe.encode_prompt(prompts + ["snoopy"], "cpu", 1, False)[0]
    ends = [ids.index(49407) for ids in pipe.tokenizer(prompts + ["snoopy"], padding="max_length", max_length=77).input_ids]
    pooled = [embeds[i, e] for i, e in enumerate(ends)]
    for i in range(2):
        expected = torch.cosine_similarity(pooled[i], pooled[2], dim=0).clamp(0, 1).item()
        assert rates[i] == pytest.approx(expected, abs=1e-5)
    pipe.set_spm_transport(True, metric="clipcos")  # the reference's cosine: flattened, padding included
    flattened = pipe.get_spm_transport_rates(prompts)["snoopy"]
    for i in range(2):
        expected = torch.cosine_similarity(embeds[i].flatten(), embeds[2].flatten(), dim=0).clamp(0, 1).item()
        assert flattened[i] == pytest.approx(expected, abs=1e-5)
        assert flattened[i] != pytest.approx(rates[i], abs=1e-3)  # eoscos really reads other features
    pipe.set_spm_transport(True, metric="eoscos_tokenuni")
    assert pipe.get_spm_transport_rates(prompts)["snoopy"][1] == pytest.approx(1.0)  # token overlap


def test_tokensim_is_a_soft_token_overlap():
    table = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0], [-1.0, 0.0]])  # tokens 0..3
    scores = tokensim([{0}, {1}, {2}, {3}, set(), {2, 1}], [{0}, {0, 2}], table)
    expected = torch.tensor([
        [1.0, 0.5],           # the concept's own token; half of a two-token concept
        [0.6, (0.6 + 0.8) / 2],  # a "synonym": the cosine of the embeddings
        [0.0, 0.5],           # orthogonal
        [0.0, 0.0],           # opposite: clamped at 0, never negative
        [0.0, 0.0],           # empty prompt
        [0.6, (0.6 + 1.0) / 2],
    ])
    torch.testing.assert_close(scores, expected)
    assert bool((scores >= tokenuni([{0}, {1}, {2}, {3}, set(), {2, 1}], [{0}, {0, 2}])).all())


def test_tokensim_rates_a_synonym_by_its_word_embedding(pipe, snoopy):
    _, path = snoopy
    pipe.load_spm(path)
    pipe.set_spm_transport(True, metric="tokensim")
    ids = pipe.tokenizer(["snoopy", "beagle", "car"], add_special_tokens=False).input_ids
    assert all(len(i) == 1 for i in ids), ids
    snoopy_id, beagle_id, car_id = (i[0] for i in ids)
    table = pipe.text_encoder.get_input_embeddings().weight
    with torch.no_grad():  # "beagle" at cosine 0.8 from "snoopy"
        s, c = table[snoopy_id].clone(), table[car_id].clone()
        orthogonal = torch.nn.functional.normalize(c - (c @ s) / (s @ s) * s, dim=0)
        table[beagle_id] = 0.8 * s + 0.6 * s.norm() * orthogonal
    rates = pipe.get_spm_transport_rates(["a photo of snoopy", "a photo of a beagle", "a red car"])["snoopy"]
    assert rates[0] == pytest.approx(1.0)
    assert rates[1] == pytest.approx(0.8, abs=1e-5)
    words = pipe.tokenizer("a red car", add_special_tokens=False).input_ids
    normed = torch.nn.functional.normalize(table[words].detach(), dim=-1)
    best = (normed @ torch.nn.functional.normalize(table[snoopy_id].detach(), dim=0)).max().clamp(min=0).item()
    assert rates[2] == pytest.approx(best, abs=1e-5)


def test_settings_change_only_through_the_controller_and_invalidate_merged_weights(pipe, snoopy):
    from diffusers_spm import TransportConfig

    _, path = snoopy
    pipe.load_spm(path)
    controller = MembraneController.of(pipe.unet)
    for attribute in ("enabled", "transport", "memory"):
        with pytest.raises(AttributeError):
            setattr(controller, attribute, getattr(controller, attribute))
    changes = [
        lambda: pipe.set_spm_transport(TransportConfig(enabled=False, power=1.0)),
        lambda: pipe.set_spm_transport(True, metric="clipcos"),
        lambda: pipe.set_spm_scale(0.5),
        pipe.disable_spm,
        pipe.enable_spm,
        lambda: pipe.set_spm_memory("merged"),
        lambda: pipe.set_spm_memory("stacked"),
        lambda: pipe.set_spm_memory("auto"),
        controller.weights_changed,
    ]
    for change in changes:
        version = controller.version
        change()
        assert controller.version > version
    assert controller.transport == TransportConfig(enabled=True, metric="clipcos")
    with pytest.raises(TypeError, match="not both"):
        pipe.set_spm_transport(TransportConfig(), metric="tokenuni")
    with controller.switched(False):
        assert not controller.enabled and pipe.get_active_spms() == []
    assert controller.enabled and pipe.get_active_spms() == ["snoopy"]


def test_spm_applied_removes_only_its_own_membranes(pipe, snoopy, tmp_path):
    from diffusers_spm import TransportConfig
    from diffusers_spm.concept_world.experiments import Condition, applied

    _, path = snoopy
    random_membrane(pipe.unet, ["van gogh"], seed=2).save(tmp_path / "van_gogh.safetensors")
    pipe.load_spm(path, adapter_name="mine", scale=0.7)
    pipe.set_spm_transport(True, metric="tokenuni", floor=0.1)
    mine = pipe.get_spm_transport_rates(PROMPTS)
    before = generate(pipe, PROMPTS[0])
    block = TransportConfig(enabled=True, metric="clipcos")
    with pipe.spm_applied([tmp_path / "van_gogh.safetensors"], scale=0.5, transport=block) as names:
        assert names == ["van_gogh"] and pipe.get_active_spms() == ["mine", "van_gogh"]
        assert MembraneController.of(pipe.unet).transport == block
        assert abs(generate(pipe, PROMPTS[0]) - before).max() > 1e-4
    with pytest.raises(RuntimeError, match="inside"):
        with pipe.spm_applied([tmp_path / "van_gogh.safetensors"]):
            raise RuntimeError("inside")
    with applied(pipe, Condition("other", [tmp_path / "van_gogh.safetensors"], metric="eoscos")):
        assert pipe.get_active_spms() == ["mine", "m0"]
    controller = MembraneController.of(pipe.unet)
    assert pipe.get_active_spms() == ["mine"] and controller.adapters["mine"].scale == 0.7
    assert controller.transport == TransportConfig(enabled=True, metric="tokenuni", floor=0.1)
    assert pipe.get_spm_transport_rates(PROMPTS) == mine
    assert abs(generate(pipe, PROMPTS[0]) - before).max() == 0
