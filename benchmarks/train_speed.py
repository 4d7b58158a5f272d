"""Training speed and memory: batched vs unbatched denoiser calls (`train.batch_unet_calls`), and the
reference's loop.

Runs the same seeded iterations in several forms, their steps interleaved, and prints one table.
`--family unet` (the default): (1) the tiny test pipeline, (2) a UNet of SD-1.5 size
(`UNet2DConditionModel` defaults with 768-wide cross-attention, random weights) at a small latent
size, (3) the concept world. `--family sd3`: (1) the tiny test SD3 pipeline, (2) an SD3 transformer
of the DiT concept world's size (4 joint blocks, 3 heads of 32, dual attention in the first two;
random weights) on 8x8x4 latents. `--family flux`: the tiny test Flux pipeline. The forms:
- "reference": the reference's loop: unbatched calls, and the partial denoising runs the
  membrane as an adapter beside each layer (`with network:` in the reference);
- "unbatched": `batch_unet_calls: false`; the membrane is merged into the weights for the
  denoising loop, as in all our training;
- "batched": `batch_unet_calls: true` (the default);
- "stale": batched, and `train.denoise_batch: 5`: the latents of 5 iterations are denoised in one
  batch with the membrane of the first (an opt-in that changes the semantics; the concept-world
  table measures whether it still erases).
The partial denoising (k CFG steps with the membrane on, k ~ U[1, T)) is the same in the last two;
the "loss phase" is the rest of the step, the part that batching changes. Peak memory is the peak RSS above
the RSS at the start of each iteration (CPU, sampled every 2 ms), or the growth of
`torch.cuda.max_memory_allocated` (GPU).

    python benchmarks/train_speed.py                 # CPU defaults, a few minutes on 2 cores
    python benchmarks/train_speed.py --family sd3 --denoising-steps 30
    python benchmarks/train_speed.py --device cuda --sd15-iterations 20 --sd15-latent 64
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from conftest import tiny_components, tiny_pipeline  # noqa: E402
from tiny_dits import tiny_flux_pipeline, tiny_sd3_pipeline  # noqa: E402
from diffusers_spm.concept_world import load_concept_world_pipeline  # noqa: E402
from diffusers_spm.training import TrainingConfig  # noqa: E402
from diffusers_spm.training.trainer import MembraneTrainer  # noqa: E402


def sd15_pipeline():
    """An SD-1.5-sized UNet with random weights, and a one-layer 768-wide text encoder (its cost
    does not matter: prompts are encoded once)."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    components = tiny_components()
    torch.manual_seed(0)
    components["unet"] = UNet2DConditionModel(cross_attention_dim=768)
    components["text_encoder"] = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=768, intermediate_size=64,
        num_attention_heads=4, num_hidden_layers=1, vocab_size=49408, max_position_embeddings=77))
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_world_size_pipeline():
    """The tiny SD3 pipeline's text encoders (32 + 32 wide) with a transformer of the DiT concept
    world's size (random weights); no T5, as in the world."""
    from diffusers import SD3Transformer2DModel

    pipe = tiny_sd3_pipeline(with_t5=False)
    torch.manual_seed(0)
    pipe.transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=32,
        num_attention_heads=3, caption_projection_dim=96, joint_attention_dim=64, pooled_projection_dim=64,
        dual_attention_layers=(0, 1), qk_norm="rms_norm", pos_embed_max_size=8)
    return pipe


class PeakRSS:
    """Peak resident memory above a baseline, sampled from /proc in a thread (Linux)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")

    def rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> "PeakRSS":
        self.base = self.peak = self.rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self.rss())
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.rss())


class PhaseTimer:
    """Seconds spent in the partial denoising and in the rest of each step."""

    def __init__(self, trainer: MembraneTrainer) -> None:
        self.denoise = 0.0
        original = trainer.denoise

        def timed(plans):
            start = time.perf_counter()
            try:
                return original(plans)
            finally:
                self.denoise += time.perf_counter() - start

        trainer.denoise = timed


FORMS = ("reference", "unbatched", "batched", "stale")
STALE_BATCH = 5


def run(pipe_factory, latent: int, iterations: int, device: str, denoising_steps: int, warmup: bool
        ) -> dict[str, dict[str, float]]:
    """The forms side by side on the same seed and weights, their steps interleaved so that load
    on a shared machine hits all alike."""
    iterations = -(-iterations // STALE_BATCH) * STALE_BATCH  # whole denoise batches for the stale form
    trainers, timers, totals, peaks = {}, {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for form in FORMS:
            batched = form in ("batched", "stale")
            pipe = pipe_factory()
            config = TrainingConfig.from_dict({
                "pretrained_model": {"name_or_path": "benchmark"},
                "concepts": [{"target": "snoopy", "action": "erase_with_la", "resolution": latent * pipe.vae_scale_factor,
                              "la_strength": 1000.0, "sampling_batch_size": 4}],
                "train": {"iterations": iterations + STALE_BATCH, "optimizer_type": "AdamW", "lr_warmup_steps": 0,
                          "max_denoising_steps": denoising_steps, "batch_unet_calls": batched, "device": device,
                          "denoise_batch": STALE_BATCH if form == "stale" else 1},
                "save": {"path": tmp, "per_steps": 10 * STALE_BATCH},
            })
            trainer = trainers[form] = MembraneTrainer(config, pipe, config.concepts, torch.device(device))
            if form == "reference":
                # Without a pipeline-call scope the layers add U(Dx) beside the frozen weight on
                # every call instead of using merged weights: what the reference's network does.
                trainer.controller.call_scope = lambda: contextlib.nullcontext()
            if warmup:  # first-call overheads matter on small models only; one whole denoise batch
                for _ in range(STALE_BATCH):
                    trainer.step()
            timers[form], totals[form], peaks[form] = PhaseTimer(trainer), 0.0, 0
        for _ in range(iterations):
            for form, trainer in trainers.items():
                if device == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                with PeakRSS() as rss:
                    start = time.perf_counter()
                    trainer.step()
                    if device == "cuda":
                        torch.cuda.synchronize()
                    totals[form] += time.perf_counter() - start
                used = torch.cuda.max_memory_allocated() - base if device == "cuda" else rss.peak - rss.base
                peaks[form] = max(peaks[form], used)
        for trainer in trainers.values():
            trainer.close()
    return {f: {"its": iterations / totals[f], "loss_its": iterations / (totals[f] - timers[f].denoise),
                "denoise_its": iterations / timers[f].denoise, "denoise_share": timers[f].denoise / totals[f],
                "peak_mb": peaks[f] / 2**20} for f in trainers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", choices=("unet", "sd3", "flux"), default="unet")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids OpenMP spinning on a shared machine)")
    parser.add_argument("--denoising-steps", type=int, default=30, help="train.max_denoising_steps (reference: 30)")
    parser.add_argument("--tiny-iterations", type=int, default=10)
    parser.add_argument("--sd15-iterations", type=int, default=2, help="--family unet")
    parser.add_argument("--sd15-latent", type=int, default=8, help="latent side (8 = 64 px for SD)")
    parser.add_argument("--world-iterations", type=int, default=20,
                        help="iterations on the concept world at its training size (--family sd3: the DiT world's "
                             "size; 0: skip)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # (name, pipeline factory, latent side, iterations, warm-up)
    if args.family == "unet":
        cases = [("tiny (test UNet), 16x16 latent", tiny_pipeline, 16, args.tiny_iterations, True),
                 (f"SD-1.5-size UNet, {args.sd15_latent}x{args.sd15_latent} latent", sd15_pipeline, args.sd15_latent,
                  args.sd15_iterations, args.device == "cuda")]
        if args.world_iterations:
            world = load_concept_world_pipeline
            cases.append(("concept world, 32 px", world, 32 // world().vae_scale_factor, args.world_iterations, True))
    elif args.family == "sd3":
        cases = [("tiny SD3 (test transformer), 8x8 latent", lambda: tiny_sd3_pipeline(with_t5=False), 8,
                  args.tiny_iterations, True),
                 ("SD3, DiT-world size, 8x8x4 latent", sd3_world_size_pipeline, 8, args.world_iterations, True)]
    else:
        cases = [("tiny Flux (test transformer), 8x8 latent", tiny_flux_pipeline, 8, args.tiny_iterations, True)]
    rows = []
    for name, factory, latent, iterations, warmup in cases:
        if iterations:
            rows.append((name, run(factory, latent, iterations, args.device, args.denoising_steps, warmup)))
            print(rows[-1], flush=True)
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} threads"
    print(f"\nDevice: {device}; erase_with_la, 4 anchors, max_denoising_steps={args.denoising_steps}\n")
    print("| model | it/s reference / unbatched / batched / stale | batched vs unbatched | batched vs reference | "
          "stale vs batched | loss phase: batched vs unbatched | denoising: merged vs adapter | "
          "denoising share (unbatched / batched) | peak MB reference / unbatched / batched / stale |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in rows:
        ref, u, b, st = (r[f] for f in FORMS)
        print(f"| {name} | {ref['its']:.3f} / {u['its']:.3f} / {b['its']:.3f} / {st['its']:.3f} | "
              f"{b['its'] / u['its']:.2f}x | {b['its'] / ref['its']:.2f}x | {st['its'] / b['its']:.2f}x | "
              f"{b['loss_its'] / u['loss_its']:.2f}x | {b['denoise_its'] / ref['denoise_its']:.2f}x | "
              f"{u['denoise_share']:.0%} / {b['denoise_share']:.0%} | "
              f"{ref['peak_mb']:.0f} / {u['peak_mb']:.0f} / {b['peak_mb']:.0f} / {st['peak_mb']:.0f} |")

if __name__ == "__main__":
    main()
