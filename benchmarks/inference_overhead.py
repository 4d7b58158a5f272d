"""Inference overhead of membranes on a full-size SD 1.5 UNet (random weights, no download).

Prints one table of time ratios to the plain UNet, measured side by side in one run: each
configuration is timed right after a fresh baseline measurement, and the ratio uses that
neighbour, so slow drifts of the machine cancel. Configurations, for N membranes:

- `spm single prompt`: every row shares its gates, so the call runs on merged weights
  (`W + sum g_i dW_i`, computed once per call; its cost is shown apart, per call);
- `spm mixed batch`: each row has its own gates (two different prompts), `U (G * D x)`;
- `peft set_adapters`: diffusers/PEFT with N rank-1 LoRA adapters active;
- `reference separate`: N adapters patched in one after another, as the reference applies them.

    python benchmarks/inference_overhead.py [--latent 32] [--repeats 3] [--device cpu] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffusers_spm.architectures import unet_config  # noqa: E402
from diffusers_spm.model import CallGates, MembraneController, membrane_targets  # noqa: E402
from diffusers_spm.transport import TransportConfig  # noqa: E402
from reference_spm import apply_reference, random_membrane, remove_reference  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def timed(fn: Callable[[], object], repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    args = parser.parse_args()
    dtype, device = DTYPES[args.dtype], args.device

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config("sd1")).to(device, dtype).eval()
    sample = torch.randn(2, 4, args.latent, args.latent, device=device, dtype=dtype)
    text = torch.randn(2, 77, 768, device=device, dtype=dtype)
    step = lambda: unet(sample, 500, text)
    targets = membrane_targets(unet)
    adapted_bytes = sum(m.weight.numel() * m.weight.element_size() for _, m in targets.values())

    rows = []
    with torch.no_grad():
        for n in args.counts:
            membranes = [random_membrane(unet, [f"concept {i}"], seed=i) for i in range(n)]
            results = {}

            controller = MembraneController.of(unet, create=True)
            for i, membrane in enumerate(membranes):
                controller.add(f"m{i}", membrane, dtype=dtype)
            controller.transport = TransportConfig(enabled=False)
            single = CallGates(torch.rand(1, n) + 0.1, None, 2)  # one prompt: CFG rows share gates
            mixed = CallGates(torch.rand(2, n) + 0.1, None, 1)  # two prompts: one row each
            with controller.pipeline_call(single):
                step()  # the merge happens here, once per call
                results["spm single prompt"] = timed(step, args.repeats, device)
            merge_start = time.perf_counter()
            with controller.pipeline_call(single):
                step()
            merge_and_step = time.perf_counter() - merge_start
            with controller.pipeline_call(mixed):
                results["spm mixed batch"] = timed(step, args.repeats, device)
            controller.detach()

            from peft import LoraConfig

            config = LoraConfig(r=1, lora_alpha=1, target_modules=sorted(p for p, _ in targets.values()),
                                init_lora_weights=False)
            for i in range(n):
                unet.add_adapter(config, adapter_name=f"a{i}")
            unet.set_adapters([f"a{i}" for i in range(n)], [0.5] * n)
            results["peft set_adapters"] = timed(step, args.repeats, device)
            unet.delete_adapters([f"a{i}" for i in range(n)])

            layers = apply_reference(unet, membranes, rates=[0.5] * n, combine=False)
            results["reference separate"] = timed(step, args.repeats, device)
            remove_reference(layers)

            for label, seconds in results.items():
                base = timed(step, args.repeats, device)
                rows.append((n, label, seconds / base, seconds, base))
            rows.append((n, "merge cost per call (s)", merge_and_step - results["spm single prompt"], None, None))

    print(f"\nSD 1.5 UNet, random weights, {device} {args.dtype}, latent {args.latent}x{args.latent}, batch 2, "
          f"median of {args.repeats}")
    print(f"merged weights held during a call: {adapted_bytes / 2**20:.0f} MiB (one copy of the 192 adapted layers)\n")
    print(f"| N | configuration | ratio to plain UNet | seconds/step | plain seconds/step |")
    print(f"|---|---|---|---|---|")
    for n, label, ratio, seconds, base in rows:
        if seconds is None:
            print(f"| {n} | {label} | {ratio:.3f} s | | |")
        else:
            print(f"| {n} | {label} | {ratio:.3f}x | {seconds:.3f} | {base:.3f} |")


if __name__ == "__main__":
    main()
