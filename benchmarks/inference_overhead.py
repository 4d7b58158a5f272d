"""Inference overhead of membranes on a full-width denoiser (random weights, no download).

Prints one table of time ratios to the plain denoiser, measured side by side in one run: each
configuration's step is timed in alternation with an untouched copy of the denoiser on the same
inputs, and the table gives the median of the per-round ratios, so drifts of the machine cancel.

Families: `sd15`, `sdxl` (the shipped UNet configs), `sd3` (SD3.5 medium: 24 joint blocks, 13 with
dual attention), `flux` (Flux.1-dev width, 3072, with fewer blocks than its 19 double + 38 single:
2 + 4 by default, `--blocks D S`); `--blocks` shortens the DiTs for a quick run.

Configurations, for N membranes:

- `spm single prompt (stacked)`: the default; rows share gates, each layer adds `U (G * D x)`;
- `spm single prompt (merged)`: `set_spm_memory("merged")`: each layer runs on `W + sum g_i dW_i`,
  merged once per call (its cost is shown apart, per call), one extra copy of the adapted weights;
- `spm mixed batch`: each row has its own gates (two different prompts), `U (G * D x)`;
- `peft set_adapters`: diffusers/PEFT with N rank-1 LoRA adapters active on the same layers;
- `reference separate`: N adapters patched in one after another, as the reference applies them.

On CUDA the peak memory over the plain denoiser is measured per configuration; on CPU the bound is
printed (largest adapted layer + the membranes).

    python benchmarks/inference_overhead.py --family flux [--latent 32] [--repeats 3] [--device cpu] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffusers_spm.architectures import unet_config  # noqa: E402
from diffusers_spm.controller import MembraneController, membrane_targets  # noqa: E402
from diffusers_spm.transport import TransportConfig  # noqa: E402
from diffusers_spm.utils import DTYPES  # noqa: E402
from reference_spm import apply_reference, random_membrane, remove_reference  # noqa: E402
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402


def seconds(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def paired(fn: Callable[[], object], plain: Callable[[], object], repeats: int, device: str) -> tuple[float, float, float]:
    """Median ratio of `fn` to `plain` over rounds that time one right after the other."""
    fn(), plain()  # warm-up
    rounds = [(seconds(fn, device), seconds(plain, device)) for _ in range(repeats)]
    return statistics.median(a / b for a, b in rounds), statistics.median(a for a, _ in rounds), statistics.median(
        b for _, b in rounds)


def build(family: str, latent: int, blocks: list[int] | None) -> tuple[nn.Module, dict[str, Any], str]:
    """A full-width denoiser of `family` (random weights) and the keyword inputs of one CFG step (batch 2)."""
    if family in ("sd15", "sdxl"):
        unet = UNet2DConditionModel.from_config(unet_config("sd1" if family == "sd15" else "sdxl"))
        width = unet.config.cross_attention_dim
        inputs = {"sample": torch.randn(2, 4, latent, latent), "timestep": 500,
                  "encoder_hidden_states": torch.randn(2, 77, width)}
        if family == "sdxl":
            inputs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 1280), "time_ids": torch.randn(2, 6)}
        return unet, inputs, f"{family} UNet"
    if family == "sd3":
        layers = blocks[0] if blocks else 24
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(min(13, layers))),
            qk_norm="rms_norm")
        inputs = {"hidden_states": torch.randn(2, 16, latent, latent), "timestep": torch.full((2,), 500.0),
                  "encoder_hidden_states": torch.randn(2, 77 + 256, 4096), "pooled_projections": torch.randn(2, 2048)}
        return transformer, inputs, f"SD3.5-medium transformer ({layers} joint blocks)"
    double, single = blocks or (2, 4)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    tokens = (latent // 2) ** 2
    inputs = {"hidden_states": torch.randn(2, tokens, 64), "timestep": torch.full((2,), 0.5),
              "encoder_hidden_states": torch.randn(2, 512, 4096), "pooled_projections": torch.randn(2, 768),
              "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(512, 3), "guidance": torch.full((2,), 3.5)}
    return transformer, inputs, f"Flux.1 transformer at full width, {double} double + {single} single blocks (of 19 + 38)"


def peak_bytes(fn: Callable[[], object], device: str) -> int | None:
    """Peak allocated memory of one call, over what was allocated before it (CUDA only)."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=("sd15", "sdxl", "sd3", "flux"), default="sd15")
    parser.add_argument("--blocks", type=int, nargs="+", help="DiT blocks: sd3 N, or flux DOUBLE SINGLE")
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-reference", action="store_true", help="skip the reference's separate adapters")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], args.device

    torch.manual_seed(0)
    denoiser, inputs, title = build(args.family, args.latent, args.blocks)
    denoiser = denoiser.to(device, dtype).eval()
    untouched = copy.deepcopy(denoiser)  # the plain denoiser, timed in alternation with each configuration
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
              for k, v in inputs.items()}
    if "added_cond_kwargs" in inputs:
        inputs["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in inputs["added_cond_kwargs"].items()}
    step = lambda: denoiser(**inputs)
    plain = lambda: untouched(**inputs)
    targets = membrane_targets(denoiser)
    sizes = [m.weight.numel() * m.weight.element_size() for _, m in targets.values()]

    rows, peaks = [], []
    with torch.no_grad():
        plain_peak = peak_bytes(plain, device)
        for n in args.counts:
            membranes = [random_membrane(denoiser, [f"concept {i}"], seed=i) for i in range(n)]
            membrane_bytes = sum(m.num_parameters() for m in membranes) * torch.finfo(dtype).bits // 8
            results = {}

            controller = MembraneController.of(denoiser, create=True)
            for i, membrane in enumerate(membranes):
                controller.add(f"m{i}", membrane, dtype=dtype)
            controller.set_transport(TransportConfig(enabled=False))
            single = torch.rand(n) + 0.1  # one prompt: CFG rows share gates
            mixed = torch.rand(2, n) + 0.1  # two prompts: one row each
            controller.row_gates = lambda sample, text: single  # as transport would rate the rows
            with controller.call_scope():
                results["spm single prompt (stacked)"] = paired(step, plain, args.repeats, device)
                peaks.append((n, "stacked", peak_bytes(step, device), membrane_bytes))
            controller.set_merge_per_call(True)
            with controller.call_scope():
                first_step = seconds(step, device)  # the merge happens here, once per call
                results["spm single prompt (merged)"] = paired(step, plain, args.repeats, device)
            with controller.call_scope():
                peaks.append((n, "merged", peak_bytes(step, device), membrane_bytes))
            controller.set_merge_per_call(False)
            merge_cost = first_step - results["spm single prompt (merged)"][1]
            controller.row_gates = lambda sample, text: mixed
            with controller.call_scope():
                results["spm mixed batch"] = paired(step, plain, args.repeats, device)
            controller.detach()

            from peft import LoraConfig

            config = LoraConfig(r=1, lora_alpha=1, target_modules=sorted(p for p, _ in targets.values()),
                                init_lora_weights=False)
            for i in range(n):
                denoiser.add_adapter(config, adapter_name=f"a{i}")
            denoiser.set_adapters([f"a{i}" for i in range(n)], [0.5] * n)
            results["peft set_adapters"] = paired(step, plain, args.repeats, device)
            denoiser.delete_adapters([f"a{i}" for i in range(n)])

            if not args.no_reference:
                layers = apply_reference(denoiser, membranes, rates=[0.5] * n, combine=False)
                results["reference separate"] = paired(step, plain, args.repeats, device)
                remove_reference(layers)

            rows += [(n, label, *result) for label, result in results.items()]
            rows.append((n, "merge cost per call (s)", merge_cost, None, None))

    mib = 2**20
    print(f"\n{title}, random weights, {device} {args.dtype}, {torch.get_num_threads()} threads, latent "
          f"{args.latent}x{args.latent}, batch 2, median of {args.repeats} alternating rounds")
    print(f"{len(targets)} adapted layers, {sum(sizes) / mib:.0f} MiB (the copy `merged` holds during a call); "
          f"largest {max(sizes) / mib:.1f} MiB\n")
    print("| N | configuration | ratio to plain | seconds/step | plain seconds/step |")
    print("|---|---|---|---|---|")
    for n, label, ratio, step_seconds, plain_seconds in rows:
        if step_seconds is None:
            print(f"| {n} | {label} | {ratio:.3f} s | | |")
        else:
            print(f"| {n} | {label} | {ratio:.3f}x | {step_seconds:.3f} | {plain_seconds:.3f} |")
    print("\n| N | memory mode | peak over plain (MiB) | bound: largest layer + membranes (MiB) |")
    print("|---|---|---|---|")
    for n, mode, peak, membrane_bytes in peaks:
        over = "n/a (CPU)" if peak is None else f"{(peak - plain_peak) / mib:.1f}"
        print(f"| {n} | {mode} | {over} | {(max(sizes) + membrane_bytes) / mib:.1f} |")


if __name__ == "__main__":
    main()
