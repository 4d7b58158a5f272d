"""Inference overhead of membranes on a full-size SD 1.5 UNet (random weights, no download).

Prints one table of time ratios to the plain UNet, measured side by side in one run: each
configuration's step is timed in alternation with an untouched copy of the UNet on the same
inputs, and the table gives the median of the per-round ratios, so drifts of the machine cancel.

Configurations, for N membranes:

- `spm single prompt`: every row shares its gates, so the call runs on merged weights
  (`W + sum g_i dW_i`, computed once per call; its cost is shown apart, per call);
- `spm mixed batch`: each row has its own gates (two different prompts), `U (G * D x)`;
- `peft set_adapters`: diffusers/PEFT with N rank-1 LoRA adapters active;
- `reference separate`: N adapters patched in one after another, as the reference applies them.

    python benchmarks/inference_overhead.py [--latent 32] [--repeats 3] [--device cpu] [--dtype fp32] [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffusers_spm.architectures import unet_config  # noqa: E402
from diffusers_spm.controller import MembraneController, membrane_targets  # noqa: E402
from diffusers_spm.transport import TransportConfig  # noqa: E402
from diffusers_spm.utils import DTYPES  # noqa: E402
from reference_spm import apply_reference, random_membrane, remove_reference  # noqa: E402
from diffusers import UNet2DConditionModel  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 5, 20])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], args.device

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_config("sd1")).to(device, dtype).eval()
    untouched = copy.deepcopy(unet)  # the plain UNet, timed in alternation with each configuration
    sample = torch.randn(2, 4, args.latent, args.latent, device=device, dtype=dtype)
    text = torch.randn(2, 77, 768, device=device, dtype=dtype)
    step = lambda: unet(sample, 500, text)
    plain = lambda: untouched(sample, 500, text)
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
            controller.set_transport(TransportConfig(enabled=False))
            single = torch.rand(n) + 0.1  # one prompt: CFG rows share gates
            mixed = torch.rand(2, n) + 0.1  # two prompts: one row each
            controller.row_gates = lambda sample, text: single  # as transport would rate the rows
            with controller.call_scope():
                first_step = seconds(step, device)  # the merge happens here, once per call
                results["spm single prompt"] = paired(step, plain, args.repeats, device)
            merge_cost = first_step - results["spm single prompt"][1]
            controller.row_gates = lambda sample, text: mixed
            with controller.call_scope():
                results["spm mixed batch"] = paired(step, plain, args.repeats, device)
            controller.detach()

            from peft import LoraConfig

            config = LoraConfig(r=1, lora_alpha=1, target_modules=sorted(p for p, _ in targets.values()),
                                init_lora_weights=False)
            for i in range(n):
                unet.add_adapter(config, adapter_name=f"a{i}")
            unet.set_adapters([f"a{i}" for i in range(n)], [0.5] * n)
            results["peft set_adapters"] = paired(step, plain, args.repeats, device)
            unet.delete_adapters([f"a{i}" for i in range(n)])

            layers = apply_reference(unet, membranes, rates=[0.5] * n, combine=False)
            results["reference separate"] = paired(step, plain, args.repeats, device)
            remove_reference(layers)

            rows += [(n, label, *result) for label, result in results.items()]
            rows.append((n, "merge cost per call (s)", merge_cost, None, None))

    print(f"\nSD 1.5 UNet, random weights, {device} {args.dtype}, {torch.get_num_threads()} threads, latent {args.latent}x{args.latent}, batch 2, "
          f"median of {args.repeats} alternating rounds")
    print(f"merged weights held during a call: {adapted_bytes / 2**20:.0f} MiB (one copy of the 192 adapted layers)\n")
    print("| N | configuration | ratio to plain UNet | seconds/step | plain seconds/step |")
    print("|---|---|---|---|---|")
    for n, label, ratio, step_seconds, plain_seconds in rows:
        if step_seconds is None:
            print(f"| {n} | {label} | {ratio:.3f} s | | |")
        else:
            print(f"| {n} | {label} | {ratio:.3f}x | {step_seconds:.3f} | {plain_seconds:.3f} |")


if __name__ == "__main__":
    main()
