"""Inference overhead of membranes on a full-width denoiser (random weights, no download).

Prints one table of time ratios to the plain denoiser, measured side by side in one run: each
configuration's step is timed in alternation with a plain copy of the denoiser (the same weight
tensors, no hooks) on the same inputs, and the table gives the median of the per-round ratios, so
drifts of the machine cancel.

Families: `sd15`, `sdxl` (the shipped UNet configs), `sd3` (SD3.5 medium: 24 joint blocks, 13 with
dual attention), `flux` (Flux.1-dev width, 3072, with fewer blocks than its 19 double + 38 single:
2 + 4 by default, `--blocks D S`); `--blocks` shortens the DiTs (full width; the ratio is per block).

The table gives each ratio's median and the lowest and highest round, and a first row times the
plain step against itself: its distance from 1.000x is the noise floor of the run.

Gates come from real transport, as in a pipeline call: the N membranes' concepts ("concept i") and
the prompts are encoded by CLIP text encoders at the family's widths, observed by the runtime's hooks,
with random weights and 2 layers, since rating reads their outputs, not their depth (UNets: their
states are the text states; DiTs: their pooled outputs are the `pooled_projections`, as
`encode_prompt` joins them, beside random text states of the family's shape), and every denoiser
forward computes its gates through `MembraneController.row_gates`. Configurations, for N membranes:

- `spm single prompt, pipeline call (auto, default)`: the default route. One prompt under CFG: rows
  share gates, and each layer runs the cheaper of the stacked form `W x + U (G * D x)` and one op on a
  transient `W + sum g_i dW_i` (`set_spm_memory("auto")`). Inside the call's scope, as `pipe(...)`
  opens it: UNets trace and rate the text states once per call (`CallScope.rates`), DiTs lay the
  per-call gates on the rows;
- `spm single prompt, pipeline call (stacked)`: the same with `set_spm_memory("stacked")`: every
  layer adds `U (G * D x)`, no weight is copied;
- `rating saved per forward`: the same forward outside any call scope (a hand-written loop on the
  denoiser: UNets trace and rate the text rows at every forward, DiTs trace them through their
  pooled text and score them text by text, and every layer scales its `U` again) timed against the
  pipeline call's, side by side; the
  seconds rows time one rating of the step's rows alone, and on DiTs one of rows whose pooled text
  no observed encoder produced (the flattened cosine fallback);
- `spm single prompt, pipeline call (merged)`: `set_spm_memory("merged")`: each layer runs on
  `W + sum g_i dW_i`, merged once per call (its cost is shown apart, per call), one extra copy of the
  adapted weights;
- `spm mixed batch, pipeline call`: two different prompts, one row each, own gates, `U (G * D x)`;
- `peft set_adapters`: diffusers/PEFT with N rank-1 LoRA adapters active on the same layers;
- `reference separate`: N adapters patched in one after another, as the reference applies them.

Peak memory over the plain denoiser, per SPM configuration: on CUDA `max_memory_allocated`, on CPU
the peak of the allocations PyTorch's profiler records during one step (`profile_memory`), a call's
first (which also makes what the call keeps, each layer's gate-scaled U), each over the same measure
of a plain step; beside it the bound (largest adapted layer + the membranes).

`--skip stacked merged peft reference rating` leaves configurations out; `--text-tokens` shortens a DiT's text
states (Flux's `max_sequence_length`) for a quicker CPU run.

    python benchmarks/inference_overhead.py --family flux [--latent 32] [--repeats 3] [--device cpu] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import contextvars
import copy
import itertools
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from diffusers_spm.architectures import unet_config  # noqa: E402
from diffusers_spm.controller import MembraneController, PromptGates, membrane_targets  # noqa: E402
from diffusers_spm.families import TextEncoding  # noqa: E402
from diffusers_spm.utils import DTYPES  # noqa: E402
from reference_spm import apply_reference, random_membrane, remove_reference  # noqa: E402
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: E402


@dataclass(frozen=True)
class Paired:
    """Per-round ratios of a configuration's step to the plain step (median, spread) and the median times."""

    ratio: float
    low: float
    high: float
    seconds: float
    plain_seconds: float


@dataclass(frozen=True)
class Timer:
    """Times steps by the wall clock, or by this process's CPU time (`--clock cpu`): on a shared CPU
    machine with one torch thread, the CPU time leaves out the time other jobs hold the cores."""

    device: str
    clock: Callable[[], float] = time.perf_counter

    def seconds(self, fn: Callable[[], object]) -> float:
        if self.device == "cuda":
            torch.cuda.synchronize()
        start = self.clock()
        fn()
        if self.device == "cuda":
            torch.cuda.synchronize()
        return self.clock() - start

    def paired(self, fn: Callable[[], object], plain: Callable[[], object], repeats: int) -> Paired:
        """`fn` against `plain` over rounds that time one right after the other."""
        fn(), plain()  # warm-up
        rounds = [(self.seconds(fn), self.seconds(plain)) for _ in range(repeats)]
        ratios = [a / b for a, b in rounds]
        return Paired(statistics.median(ratios), min(ratios), max(ratios), statistics.median(a for a, _ in rounds),
                      statistics.median(b for _, b in rounds))


TEXT_LENGTH = {"sd15": 77, "sdxl": 77, "sd3": 77 + 256, "flux": 512}


def cfg(shape: tuple[int, ...]) -> torch.Tensor:
    """A random input of one sample, repeated for the two rows of a CFG step (diffusers' layout)."""
    return torch.randn(1, *shape).repeat(2, *([1] * len(shape)))


def build(family: str, latent: int, blocks: list[int] | None, text_tokens: int) -> tuple[nn.Module, dict[str, Any], str]:
    """A full-width denoiser of `family` (random weights) and the keyword inputs of one CFG step (batch 2),
    less the text states and pooled text (each configuration brings its own)."""
    if family in ("sd15", "sdxl"):
        unet = UNet2DConditionModel.from_config(unet_config("sd1" if family == "sd15" else "sdxl"))
        inputs = {"sample": cfg((4, latent, latent)), "timestep": 500}
        if family == "sdxl":
            inputs["added_cond_kwargs"] = {"text_embeds": cfg((1280,)), "time_ids": cfg((6,))}
        return unet, inputs, f"{family} UNet"
    if family == "sd3":
        layers = blocks[0] if blocks else 24
        transformer = SD3Transformer2DModel(
            sample_size=128, patch_size=2, in_channels=16, num_layers=layers, attention_head_dim=64,
            num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
            out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(min(13, layers))),
            qk_norm="rms_norm")
        inputs = {"hidden_states": cfg((16, latent, latent)), "timestep": torch.full((2,), 500.0)}
        return transformer, inputs, f"SD3.5-medium transformer at full width, {layers} joint blocks (of 24)"
    double, single = blocks or (2, 4)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56))
    tokens = (latent // 2) ** 2
    inputs = {"hidden_states": cfg((tokens, 64)), "timestep": torch.full((2,), 0.5),
              "img_ids": torch.zeros(tokens, 3), "txt_ids": torch.zeros(text_tokens, 3), "guidance": torch.full((2,), 3.5)}
    return transformer, inputs, f"Flux.1 transformer at full width, {double} double + {single} single blocks (of 19 + 38)"


BOS, EOS = 49406, 49407  # CLIP's; the synthetic vocabulary numbers words from 1000
_VOCABULARY: dict[str, int] = {}


def token_ids(texts: list[str]) -> torch.Tensor:
    """CLIP-style ids ([BOS, words, EOS, EOS padding], 77 long) of a whitespace vocabulary."""
    rows = []
    for text in texts:
        words = [_VOCABULARY.setdefault(word, 1000 + len(_VOCABULARY)) for word in text.split()]
        rows.append([BOS, *words, EOS] + [EOS] * (75 - len(words)))
    return torch.tensor(rows)


class Texts:
    """Prompts and concepts encoded as a pipeline encodes them, so forwards rate real text states.

    CLIP text encoders at the family's widths, random weights, 2 layers, observed by the runtime's hooks
    (CLIP-L the token encoder, as `load_spm` sets it): CLIP-L (SD 1.5, Flux), CLIP-L and bigG (SDXL),
    both with projections (SD3). UNets: their states are the text states (SD 1.5: CLIP-L's last layer;
    SDXL: the penultimate layers side by side). DiTs: their pooled outputs, side by side, are the
    pooled text, by which forwards trace their rows; the text states are random, of the family's
    shape (the T5 part is not traced)."""

    def __init__(self, family: str, dtype: torch.dtype, device: str, length: int) -> None:
        self.family, self.dtype, self.device, self.length = family, dtype, device, length
        config = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=BOS, eos_token_id=EOS,
                      pad_token_id=EOS, num_hidden_layers=2)
        self.encoders: list[nn.Module] = [(CLIPTextModelWithProjection if family == "sd3" else CLIPTextModel)(
            CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12, projection_dim=768, **config))]
        if family in ("sdxl", "sd3"):
            self.encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(
                hidden_size=1280, intermediate_size=5120, num_attention_heads=20, projection_dim=1280, **config)))
        self.encoders = [e.to(device, dtype).eval() for e in self.encoders]

    def observe(self, controller: MembraneController) -> None:
        controller.observe_text_encoders([(encoder, {BOS, EOS}, EOS) for encoder in self.encoders],
                                         token_encoder=self.encoders[0])

    @torch.no_grad()
    def encode(self, texts: list[str]) -> TextEncoding:
        ids = token_ids(texts).to(self.device)
        outputs = [e(ids, output_hidden_states=True) for e in self.encoders]
        if self.family in ("sd3", "flux"):  # pooled: SD3's `text_embeds` of both, Flux's `pooler_output`
            pooled = torch.cat([o["text_embeds"] if "text_embeds" in o else o.pooler_output for o in outputs], dim=-1)
            states = torch.randn(len(texts), self.length, 4096).to(self.device, self.dtype)
            return TextEncoding(states, [set(row.tolist()) - {BOS, EOS} for row in ids], pooled.unsqueeze(1))
        if self.family == "sd15":
            states = outputs[0].last_hidden_state
        else:
            states = torch.cat([o.hidden_states[-2] for o in outputs], dim=-1)
        return TextEncoding(states, [], states[:, -1:])


def peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak memory PyTorch allocates during one call, over what was allocated before it: on CUDA its
    allocator's peak, on CPU the running sum of the allocations and frees the profiler records."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        fn()
    events = sorted((e for e in profile.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    return max(itertools.accumulate((e.nbytes() for e in events), initial=0))


def plain_copy(denoiser: nn.Module) -> nn.Module:
    """The denoiser without our hooks, PEFT's layers or the reference's patches, on the same weight tensors."""
    shared = {id(t): t for t in itertools.chain(denoiser.parameters(), denoiser.buffers())}
    return copy.deepcopy(denoiser, shared)


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
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="time steps by the wall clock or by the process's CPU time (a shared CPU, one thread)")
    parser.add_argument("--skip", nargs="+", default=[], choices=("stacked", "merged", "peft", "reference", "rating"),
                        help="configurations to leave out")
    parser.add_argument("--text-tokens", type=int, help="DiTs: text-state length (default: the family's, 333 / 512)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype, device = DTYPES[args.dtype], args.device
    if args.clock == "cpu" and device != "cpu":
        parser.error("--clock cpu times CPU steps; on an accelerator use the wall clock")
    timer = Timer(device, time.process_time if args.clock == "cpu" else time.perf_counter)

    torch.manual_seed(0)
    text_tokens = TEXT_LENGTH[args.family] if args.family in ("sd15", "sdxl") else args.text_tokens or TEXT_LENGTH[args.family]
    with torch.device(device):  # a full-size Flux initialises in seconds on an accelerator, minutes on a CPU
        denoiser, inputs, title = build(args.family, args.latent, args.blocks, text_tokens)
    denoiser = denoiser.to(device, dtype).eval()
    plain_denoiser = plain_copy(denoiser)
    inputs = {k: v.to(device, dtype if v.is_floating_point() else v.dtype) if torch.is_tensor(v) else v
              for k, v in inputs.items()}
    if "added_cond_kwargs" in inputs:
        inputs["added_cond_kwargs"] = {k: v.to(device, dtype) for k, v in inputs["added_cond_kwargs"].items()}
    targets = membrane_targets(denoiser)
    sizes = [m.weight.numel() * m.weight.element_size() for _, m in targets.values()]
    texts = Texts(args.family, dtype, device, text_tokens)

    rows, peaks = [], []
    with torch.no_grad():
        for n in args.counts:
            membranes = [random_membrane(denoiser, [f"concept {i}"], seed=i) for i in range(n)]
            membrane_bytes = sum(m.num_parameters() for m in membranes) * torch.finfo(dtype).bits // 8
            results, seconds_rows = {}, []

            controller = MembraneController.of(denoiser, create=True)
            for i, membrane in enumerate(membranes):
                controller.add(f"m{i}", membrane, dtype=dtype)
            texts.observe(controller)
            for i in range(n):
                controller.set_concepts(f"m{i}", texts.encode([f"concept {i}"]))
            prompt = texts.encode(["a photo of concept 0"])  # encoded before its negative, as `encode_prompt` does
            single_text = TextEncoding.concatenate([texts.encode([""]), prompt])  # CFG: [negative, prompt]
            mixed = texts.encode(["a photo of concept 0", "a red car"])
            family = controller.family
            if family.rates_per_call:  # the gates `pipe(...)` computes once per call
                gates = lambda p: controller.transport.gates(
                    controller.text_rates(p, controller.token_encoder.token_table()), controller.scales())
                single_gates, mixed_gates = PromptGates(gates(prompt), None, 1), PromptGates(gates(mixed), None, 1)
            else:  # traced from the text states at the forwards
                single_gates = mixed_gates = None
            # what the denoiser takes: the text states, and the pooled text on DiTs (their rows' trace)
            taken = lambda e: (e.embeds, e.pooled[:, 0] if family.pooled_argument else None)
            names = [a.name for a in (family.text_argument, family.pooled_argument) if a]
            forward = lambda module, e: (lambda: module(**inputs, **dict(zip(names, taken(e)))))
            single, mixed_step = forward(denoiser, single_text), forward(denoiser, mixed)
            plain_single, plain_mixed = forward(plain_denoiser, single_text), forward(plain_denoiser, mixed)
            # the step's rows are traced to their texts, or the rating rows below time the cosine fallback
            assert all(row is not None for row in controller.rates(*taken(single_text))[1]), "rows not traced"
            outside_call = lambda: contextvars.Context().run(single)  # no call scope: a hand-written loop

            plain_peak = peak_bytes(plain_single, device)
            results["plain against plain (the noise floor)"] = timer.paired(plain_single, plain_single, args.repeats)
            # Peaks are read on a call's first step, which also makes what the call keeps (each layer's scaled U).
            with controller.call_scope(single_gates):
                peaks.append((n, "auto, single prompt", peak_bytes(single, device) - plain_peak, membrane_bytes))
            with controller.call_scope(single_gates):
                results["spm single prompt, pipeline call (auto, default)"] = timer.paired(single, plain_single, args.repeats)
                if "rating" not in args.skip:
                    results["rating saved per forward: rated every forward / pipeline call"] = timer.paired(
                        outside_call, single, args.repeats)
            rating = lambda *rows: statistics.median(timer.seconds(lambda: controller.rates(*rows)) for _ in range(5))
            seconds_rows.append(("rating the text states once (s)", rating(*taken(single_text))))
            if family.pooled_argument:  # rows whose pooled text no observed encoder produced
                text, pooled = taken(single_text)
                seconds_rows.append(("rating once, untraced (cosine fallback) (s)", rating(text, torch.randn_like(pooled))))

            if "stacked" not in args.skip:
                controller.set_memory("stacked")
                with controller.call_scope(single_gates):
                    peaks.append((n, "stacked, single prompt", peak_bytes(single, device) - plain_peak, membrane_bytes))
                with controller.call_scope(single_gates):
                    results["spm single prompt, pipeline call (stacked)"] = timer.paired(single, plain_single, args.repeats)
                controller.set_memory("auto")

            if "merged" not in args.skip:
                controller.set_memory("merged")
                with controller.call_scope(single_gates):
                    first_step = timer.seconds(single)  # the merge happens here, once per call
                    merged = results["spm single prompt, pipeline call (merged)"] = timer.paired(
                        single, plain_single, args.repeats)
                with controller.call_scope(single_gates):
                    peaks.append((n, "merged, single prompt", peak_bytes(single, device) - plain_peak, membrane_bytes))
                controller.set_memory("auto")
                seconds_rows.append(("merge cost per call (s)", first_step - merged.seconds))

            plain_peak = peak_bytes(plain_mixed, device)
            with controller.call_scope(mixed_gates):
                assert controller.row_gates(inputs[family.batch_argument.name], *taken(mixed)).dim() == 2
                results["spm mixed batch, pipeline call (stacked)"] = timer.paired(mixed_step, plain_mixed, args.repeats)
                peaks.append((n, "stacked, mixed batch", peak_bytes(mixed_step, device) - plain_peak, membrane_bytes))
            controller.detach()

            if "peft" not in args.skip:
                from peft import LoraConfig

                config = LoraConfig(r=1, lora_alpha=1, target_modules=sorted(p for p, _ in targets.values()),
                                    init_lora_weights=False)
                for i in range(n):
                    denoiser.add_adapter(config, adapter_name=f"a{i}")
                denoiser.set_adapters([f"a{i}" for i in range(n)], [0.5] * n)
                results["peft set_adapters"] = timer.paired(single, plain_single, args.repeats)
                denoiser.delete_adapters([f"a{i}" for i in range(n)])

            if "reference" not in args.skip:
                layers = apply_reference(denoiser, membranes, rates=[0.5] * n, combine=False)
                results["reference separate"] = timer.paired(single, plain_single, args.repeats)
                remove_reference(layers)

            rows += [(n, label, result) for label, result in results.items()]
            rows += [(n, label, value) for label, value in seconds_rows]
            print(f"N = {n}: " + ", ".join(f"{label} {result.ratio:.3f}" for label, result in results.items()),
                  file=sys.stderr, flush=True)

    mib = 2**20
    print(f"\n{title}, random weights, {device} {args.dtype}, {torch.get_num_threads()} threads, latent "
          f"{args.latent}x{args.latent}, {text_tokens} text tokens, batch 2, median of {args.repeats} alternating rounds, "
          f"{'CPU time' if args.clock == 'cpu' else 'wall clock'}")
    print(f"{len(targets)} adapted layers, {sum(sizes) / mib:.0f} MiB (the copy `merged` holds during a call); "
          f"largest {max(sizes) / mib:.1f} MiB\n")
    print("| N | configuration | ratio (median) | rounds: lowest-highest | seconds/step | plain seconds/step |")
    print("|---|---|---|---|---|---|")
    for n, label, result in rows:
        if isinstance(result, Paired):
            print(f"| {n} | {label} | {result.ratio:.3f}x | {result.low:.3f}-{result.high:.3f} | {result.seconds:.3f} | "
                  f"{result.plain_seconds:.3f} |")
        else:
            print(f"| {n} | {label} | {result:.4f} s | | | |")
    print("\n| N | memory mode | peak over plain step (MiB) | + membranes (MiB) | bound: largest layer + membranes (MiB) |")
    print("|---|---|---|---|---|")
    for n, mode, peak, membrane_bytes in peaks:
        print(f"| {n} | {mode} | {peak / mib:.2f} | {(peak + membrane_bytes) / mib:.1f} | "
              f"{(max(sizes) + membrane_bytes) / mib:.1f} |")


if __name__ == "__main__":
    main()
