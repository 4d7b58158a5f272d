"""Train the DiT concept world: an SD3-shaped pipeline on the same world as the UNet one, and write it as package data.

    HF_HUB_OFFLINE=1 python scripts/train_dit_concept_world.py                 # train (resumes from its checkpoint), evaluate
    HF_HUB_OFFLINE=1 python scripts/train_dit_concept_world.py --eval-only     # re-evaluate, rewrite the model card
    HF_HUB_OFFLINE=1 python scripts/train_dit_concept_world.py --card-only     # rewrite the model card from training_stats.json
    HF_HUB_OFFLINE=1 python scripts/train_dit_concept_world.py --quick --output /tmp/dit   # a smoke run

The pipeline is a real ``StableDiffusion3Pipeline``: two ``CLIPTextModelWithProjection`` (the roles
of CLIP-L and CLIP-G; no T5, ``text_encoder_3=None``, as SD3 allows), an ``SD3Transformer2DModel``
with SD3.5's q/k RMS norm and dual attention in its first blocks, and a
``FlowMatchEulerDiscreteScheduler``. The autoencoder, the tokenizer and the judge are the UNet world's,
so both worlds share a latent space and are judged by the same judge.

Training (one process, fixed seeds, deterministic; a checkpoint every ``--checkpoint-every`` steps,
from which a rerun of the same command resumes exactly):
1. a pool of renders, encoded by the UNet world's autoencoder (latents x its scaling factor);
2. the transformer from scratch and both text encoders jointly, with the flow-matching loss:
   ``x_s = (1 - s) x0 + s e``, target ``e - x0``, ``s`` half logit-normal (SD3's choice) and half
   uniform (so the ends of the schedule are trained too), 10 % empty captions for classifier-free
   guidance, EMA. The first text encoder starts from the UNet world's (its token and position
   embeddings and layers), the second from scratch. Without T5 the pipeline appends 256 zero rows
   to the text states; all but the last ``--full-rows-steps`` steps train with 24 (3x cheaper), the
   last ones with the pipeline's 256, so the model is tuned to what it gets;
3. evaluation: the judge on images generated from held-out prompts; fp16 weights and a model card
   (README.md, written from training_stats.json alone, so `--card-only` rewrites it in seconds).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusers_spm.concept_world import model as cw_model
from diffusers_spm.concept_world.judge import Judge, judge_accuracy
from diffusers_spm.concept_world.metrics import generate_images
from diffusers_spm.concept_world.world import ConceptWorld
from train_concept_world import (
    Ema,
    TokenCache,
    encode_pool,
    heldout_prompts,
    render_pool,
    sample_batch,
    save_grid,
    size_mb,
)

logger = logging.getLogger("train_dit_concept_world")

SEED = 20261128
STATS = "training_stats.json"
CHECKPOINT = "checkpoint.pt"
PIPELINE_T5_ROWS = 256  # the pipeline's default `max_sequence_length`: zero rows when there is no T5
MAX_TOKENS = 24  # the longest caption of the world is 17 tokens with its start and end tokens
WIDTHS = (64, 32)  # text encoder 1 (the UNet world's width) and 2
OUTPUT = cw_model.world_model("sd3").directory


def make_tokenizer() -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(cw_model.TOKENIZER_DIR), model_max_length=MAX_TOKENS)


def clip_config(width: int, layers: int, heads: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=heads, max_position_embeddings=MAX_TOKENS, projection_dim=width,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
    )


def make_text_encoders() -> tuple[CLIPTextModelWithProjection, CLIPTextModelWithProjection]:
    """Encoder 1 takes the UNet world's trained text transformer (positions cut to MAX_TOKENS)."""
    first = CLIPTextModelWithProjection(clip_config(WIDTHS[0], layers=3, heads=4))
    trained = CLIPTextModel.from_pretrained(cw_model.WEIGHTS_DIR / "text_encoder", dtype=torch.float32).state_dict()
    trained["embeddings.position_embedding.weight"] = trained["embeddings.position_embedding.weight"][:MAX_TOKENS]
    trained.pop("embeddings.position_ids", None)
    first.text_model.load_state_dict(trained)
    return first, CLIPTextModelWithProjection(clip_config(WIDTHS[1], layers=2, heads=2))


def make_transformer(layers: int, heads: int) -> SD3Transformer2DModel:
    """8x8x4 latents, patch 1 (64 image tokens); dual attention in the first half of the blocks, as SD3.5."""
    return SD3Transformer2DModel(
        sample_size=cw_model.LATENT_SIZE, patch_size=1, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=32, num_attention_heads=heads, joint_attention_dim=sum(WIDTHS),
        caption_projection_dim=32 * heads, pooled_projection_dim=sum(WIDTHS), pos_embed_max_size=cw_model.LATENT_SIZE,
        qk_norm="rms_norm", dual_attention_layers=tuple(range(layers // 2)),
    )


def make_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """No shift: a shift suits large images (SD3 uses 3.0 at 1024 px); these latents are 8x8."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def load_vae() -> AutoencoderKL:
    vae = AutoencoderKL.from_pretrained(cw_model.WEIGHTS_DIR / "vae", dtype=torch.float32)
    vae.register_to_config(shift_factor=0.0)  # SD3's pipeline decodes latents / scaling + shift
    return vae


def encode_text(encoders, ids: tuple[torch.Tensor, torch.Tensor], t5_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What `StableDiffusion3Pipeline.encode_prompt` computes without T5: both CLIPs' penultimate
    states side by side, then `t5_rows` zero rows (T5's place, `max_sequence_length` of them), and the
    pooled projections side by side."""
    states, pooled = [], []
    for encoder, tokens in zip(encoders, ids):
        out = encoder(tokens, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    clip = torch.cat(states, dim=-1)
    t5 = clip.new_zeros(clip.shape[0], t5_rows, clip.shape[-1])
    return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


def assemble(transformer, encoders, vae, tokenizer) -> StableDiffusion3Pipeline:
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=make_scheduler(), vae=vae, text_encoder=encoders[0], tokenizer=tokenizer,
        text_encoder_2=encoders[1], tokenizer_2=tokenizer, text_encoder_3=None, tokenizer_3=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_encoding(pipe: StableDiffusion3Pipeline) -> None:
    """The training encoding must be the pipeline's, or the model learns a conditioning it never gets."""
    texts = ["a red striped circle", ""]
    ids = tuple(pipe.tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt").input_ids for _ in range(2))
    with torch.no_grad():
        ours = encode_text((pipe.text_encoder, pipe.text_encoder_2), ids, PIPELINE_T5_ROWS)
        theirs = pipe.encode_prompt(texts, None, None, do_classifier_free_guidance=False)
    for a, b in zip(ours, (theirs[0], theirs[2])):
        if a.shape != b.shape or not torch.allclose(a, b, atol=1e-5):
            raise RuntimeError("the training encoding differs from StableDiffusion3Pipeline.encode_prompt")


def sample_sigmas(rng: torch.Generator, n: int) -> torch.Tensor:
    logit_normal = torch.sigmoid(torch.randn(n, generator=rng))
    uniform = torch.rand(n, generator=rng)
    return torch.where(torch.rand(n, generator=rng) < 0.5, logit_normal, uniform)


def lr_factor(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(args: argparse.Namespace, world: ConceptWorld) -> None:
    """Train from scratch or, with `--resume-steps`, continue the saved model (fresh warm-up, cosine and
    EMA, seeds of its own); either run resumes exactly from its checkpoint when rerun."""
    out = args.output
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    tokenizer, vae = make_tokenizer(), load_vae()
    if args.resume_steps:
        stats = json.loads((out / STATS).read_text())
        steps, seed = args.resume_steps, args.seed + 10 * (1 + len(stats.get("resumes", [])))
        transformer = SD3Transformer2DModel.from_pretrained(out / "transformer", dtype=torch.float32)
        encoders = tuple(CLIPTextModelWithProjection.from_pretrained(out / name, dtype=torch.float32)
                         for name in ("text_encoder", "text_encoder_2"))
    else:
        steps, seed = args.steps, args.seed
        torch.manual_seed(seed)
        transformer = make_transformer(args.layers, args.heads)
        encoders = make_text_encoders()
    check_encoding(assemble(transformer, encoders, vae, tokenizer))
    params = [p for m in (transformer, *encoders) for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99))
    warmup = min(300, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, steps, warmup))
    ema = Ema(params, args.ema_decay)
    rng = np.random.default_rng(seed + 2)
    noise_rng = torch.Generator().manual_seed(seed + 3)
    start, elapsed = 0, 0.0
    checkpoint = out / CHECKPOINT
    state = torch.load(checkpoint, weights_only=False) if checkpoint.exists() else None
    if state is not None and state.get("seed", args.seed) != seed:
        raise RuntimeError(f"{checkpoint} belongs to another run (seed {state['seed']}, this one {seed}); remove it")
    if state is not None:
        for module, key in ((transformer, "transformer"), (encoders[0], "text_encoder"), (encoders[1], "text_encoder_2")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        ema.shadow, ema.steps = state["ema_shadow"], state["ema_steps"]
        rng.bit_generator.state = state["numpy_rng"]
        noise_rng.set_state(state["noise_rng"])
        start, elapsed = state["step"], state["elapsed_s"]
        logger.info("resuming at step %d", start)

    images, scenes = render_pool(world, args.pool, args.seed + 1)
    with torch.no_grad():
        latents = encode_pool(vae, images) * vae.config.scaling_factor
    del images
    tokens = TokenCache(tokenizer, MAX_TOKENS)

    for module in (transformer, *encoders):
        module.train()
    t_loop = time.time()
    running = 0.0
    bar = tqdm(range(start, steps), desc="transformer+text", mininterval=30, initial=start, total=steps)
    for step in bar:
        x0, texts = sample_batch(latents, scenes, world, rng, args)
        noise = torch.randn(x0.shape, generator=noise_rng)
        sigma = sample_sigmas(noise_rng, args.batch_size)
        xt = (1 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise
        ids = tokens(texts)
        t5_rows = PIPELINE_T5_ROWS if step >= steps - args.full_rows_steps else MAX_TOKENS
        embeds, pooled = encode_text(encoders, (ids, ids), t5_rows)
        pred = transformer(xt, embeds, pooled, sigma * 1000).sample
        loss = (pred - (noise - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        ema.update()
        running = loss.item() if step == start else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{running:.4f}")
        if (step + 1) % args.checkpoint_every == 0 and step + 1 < steps:
            save_checkpoint(checkpoint, dict(
                step=step + 1, seed=seed, elapsed_s=elapsed + time.time() - t_loop, transformer=transformer.state_dict(),
                text_encoder=encoders[0].state_dict(), text_encoder_2=encoders[1].state_dict(), optimizer=opt.state_dict(),
                scheduler=sched.state_dict(), ema_shadow=ema.shadow, ema_steps=ema.steps,
                numpy_rng=rng.bit_generator.state, noise_rng=noise_rng.get_state(),
            ))
            logger.info("checkpoint at step %d, loss %.4f", step + 1, running)
    elapsed += time.time() - t_loop
    ema.copy_to()

    for name, module in (("transformer", transformer), ("text_encoder", encoders[0]), ("text_encoder_2", encoders[1])):
        module.eval().to(torch.float16).save_pretrained(out / name, safe_serialization=True)
    vae.to(torch.float16).save_pretrained(out / "vae", safe_serialization=True)
    for name in ("tokenizer", "tokenizer_2"):  # the UNet world's vocabulary files (a tokenizer.json would be 2x larger)
        shutil.copytree(cw_model.TOKENIZER_DIR, out / name, dirs_exist_ok=True)
        config = json.loads((out / name / "tokenizer_config.json").read_text())
        (out / name / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": MAX_TOKENS}, indent=2))
    make_scheduler().save_pretrained(out / "scheduler")
    assemble(transformer, encoders, vae, tokenizer).save_config(out)
    recorded = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    if args.resume_steps:
        stats["resumes"] = [*stats.get("resumes", []), {k: recorded[k] for k in ("resume_steps", "lr", "ema_decay", "full_rows_steps", "threads")}]
        stats["timings_s"]["resumed_diffusion"] = round(stats["timings_s"].get("resumed_diffusion", 0) + elapsed, 1)
        stats["final_loss"] = running
    else:
        stats = {
            "parameters": {name: sum(p.numel() for p in m.parameters()) for name, m in
                           (("transformer", transformer), ("text_encoder", encoders[0]), ("text_encoder_2", encoders[1]))},
            "final_loss": running,
            "timings_s": {"diffusion": round(elapsed, 1), "setup": round(t_loop - t_start, 1)},
            "args": recorded,
        }
    (out / STATS).write_text(json.dumps(stats, indent=2))
    checkpoint.unlink(missing_ok=True)


def evaluate(args: argparse.Namespace, world: ConceptWorld) -> None:
    out = args.output
    stats = json.loads((out / STATS).read_text())
    t0 = time.time()
    judge = Judge.load(cw_model.JUDGE_DIR)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32,
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = heldout_prompts(world, per_combo=2, seed=args.seed + 200)
    images = generate_images(pipe, [c.text for c in prompts], seeds=list(range(len(prompts))),
                             num_inference_steps=args.eval_steps, guidance_scale=args.guidance_scale, progress=True)
    accuracy = judge_accuracy(judge, images, [c.named() for c in prompts])
    logger.info("generated images, held-out prompts: %s", accuracy)
    save_grid(images[:: max(1, len(images) // 64)][:64], out / "samples.png")
    stats["timings_s"]["eval"] = round(time.time() - t0, 1)
    stats.update(generated_heldout_accuracy=accuracy, n_generated=len(prompts), guidance_scale=args.guidance_scale,
                 num_inference_steps=args.eval_steps)
    (out / STATS).write_text(json.dumps(stats, indent=2))
    write_model_card(out, world)
    logger.info("wrote %s (%.1f MB)", out, size_mb(out))


def reproducing_command(recorded: dict) -> str:
    """The command line of a training run from its recorded arguments: the flags that differ from the
    defaults (`--quick`'s own, for a quick run); `--eval-only` and `--card-only` do not train."""
    quick = bool(recorded.get("quick"))
    defaults = vars(parse_args(["--quick"] if quick else []))
    flags = ["--quick"] if quick else []
    flags += [f"--{key.replace('_', '-')} {value}" for key, value in recorded.items()
              if key not in ("quick", "eval_only", "card_only", "resume_steps") and key in defaults and str(value) != str(defaults[key])]
    return " ".join(["HF_HUB_OFFLINE=1 python scripts/train_dit_concept_world.py", *flags])


def resume_threads(resume: dict) -> str:
    """The `--threads` flag of a recorded resume, if it was not the default 1 (results depend on it)."""
    threads = resume.get("threads", 1)
    return "" if threads == 1 else f" --threads {threads}"


def stored_parameters(directory: Path) -> int:
    """Parameters in a component folder's safetensors files (read from their headers)."""
    from safetensors import safe_open

    total = 0
    for path in directory.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def write_model_card(out: Path, world: ConceptWorld) -> Path:
    """README.md of the DiT world, from training_stats.json and the stored files alone: what it is, the
    command that made it, sizes, the measured held-out accuracy, limits."""
    stats = json.loads((out / STATS).read_text())
    a, t, g = stats["args"], stats["timings_s"], stats["generated_heldout_accuracy"]
    transformer = json.loads((out / "transformer" / "config.json").read_text())
    trained = stats["parameters"]  # the vae is the UNet world's: its count is read from its file
    sizes = "".join(f"| {name} | {trained.get(name) or stored_parameters(out / name):,} | {size_mb(out / name):.2f} MB |\n"
                    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"))
    tokenizers = sum(size_mb(out / name) for name in ("tokenizer", "tokenizer_2"))
    root = Path(__file__).resolve().parents[1]
    written = Path(a["output"])
    copied = "" if written.resolve() == OUTPUT else f", then copied to `{OUTPUT.relative_to(root)}`"
    written = written.relative_to(root) if written.is_relative_to(root) else written  # no machine's path in the card
    examples = "; ".join(f"`{c.text}`" for c in heldout_prompts(world, per_combo=2, seed=a["seed"] + 200)[:6])
    met = "met" if g["joint"] >= 0.9 else "**not met**"
    resumed = "".join(
        f"\n   Then `HF_HUB_OFFLINE=1 python scripts/train_dit_concept_world.py --resume-steps {r['resume_steps']} --lr {r['lr']:g} "
        f"--ema-decay {r['ema_decay']:g} --full-rows-steps {r['full_rows_steps']}{resume_threads(r)}` continued it "
        "(fresh warm-up, cosine and EMA)."
        for r in stats.get("resumes", []))
    continued = f" continued training {t['resumed_diffusion'] / 60:.1f} min," if "resumed_diffusion" in t else ""
    quick = "\n**A `--quick` smoke run: untrained, for development only.**\n" if a.get("quick") else ""
    text = f"""# Concept world, DiT: a tiny flow-matching transformer that knows its concepts
{quick}
A real `StableDiffusion3Pipeline`: two `CLIPTextModelWithProjection` (the roles of CLIP-L and CLIP-G,
widths {" and ".join(map(str, WIDTHS))}), no T5 (`text_encoder_3=None`), an `SD3Transformer2DModel`
({transformer["num_layers"]} joint blocks, {transformer["num_attention_heads"]} heads of {transformer["attention_head_dim"]}, patch 1, q/k RMS norm, SD3.5's dual attention in blocks
{", ".join(map(str, transformer["dual_attention_layers"]))}) on 8x8x4 latents, and a `FlowMatchEulerDiscreteScheduler` (shift 1.0). It is trained
from scratch on the same world as the UNet concept world ({len(world.shapes)} shapes, {len(world.colours)} colours,
{len(world.textures)} textures, synonyms and caption templates, held-out template x synonym combinations) and
shares its autoencoder, tokenizer and judge, so membranes on both worlds are measured alike.

Load it with `diffusers_spm.concept_world.load_concept_world_pipeline(family="sd3")` (fp32), as
`--base {cw_model.world_model("sd3").name}` on the command line, or with
`StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)`.

## How it was made
`{reproducing_command(a)}`
(seed {a["seed"]}, torch threads {a["threads"]}; deterministic, and a rerun of the same command resumes from
its checkpoint exactly), written to `{written}`{copied}:
1. a pool of {a["pool"]} renders, encoded once by the UNet world's autoencoder;
2. the transformer and both text encoders jointly, {a["steps"]} steps of batch {a["batch_size"]}, AdamW lr {a["lr"]:g}
   (warm-up, cosine to 10 %), EMA {a["ema_decay"]:g}, gradient clipping 1.0: the flow-matching loss with
   `x_s = (1 - s) x0 + s e` and target `e - x0`, `s` half logit-normal and half uniform;
   {a["uncond_prob"]:.0%} empty captions (classifier-free guidance), each attribute left out of a caption with probability
   {a["drop_prob"]:g}. The first text encoder starts from the UNet world's, the second from scratch.{resumed}
Wall time on a 2-core CPU shared with other jobs: setup {t["setup"] / 60:.1f} min, training {t["diffusion"] / 60:.1f} min,{continued}
evaluation {t.get("eval", 0) / 60:.1f} min. Final training loss (running mean) {stats["final_loss"]:.4f}.

## Sizes
| component | parameters | stored (fp16 safetensors) |
|---|---|---|
{sizes}| tokenizer, tokenizer_2 | - | {tokenizers:.2f} MB (the UNet world's CLIP vocabulary, once per encoder) |

Total on disk: {size_mb(out):.1f} MB. Weights load as fp32 by default.

## Measured accuracy
**Generated images**, {stats["n_generated"]} held-out prompts (every shape x colour x texture, twice, with
template/synonym combinations never seen in training), one seed each, {stats["num_inference_steps"]} flow-matching Euler
steps, guidance {stats["guidance_scale"]:g}, read by the UNet world's judge: shape {g["shape"]:.1%}, colour {g["colour"]:.1%},
texture {g["texture"]:.1%}, **joint {g["joint"]:.1%}**. The target of issue 11 (joint >= 90 %) is {met}.

Example held-out prompts: {examples}. Samples: `samples.png`.

## Limits
- The 256 zero T5 rows: without T5, `StableDiffusion3Pipeline.encode_prompt` appends
  `max_sequence_length` (default {PIPELINE_T5_ROWS}) zero rows to the {MAX_TOKENS} CLIP rows. Training used {MAX_TOKENS} zero rows
  (3x cheaper) for all but the last {a["full_rows_steps"]} steps and the pipeline's {PIPELINE_T5_ROWS} for those, so call it with
  the default `max_sequence_length`; other values give text states it was not tuned to. The zero rows
  are not free: they pass through the text stream's projections and take most of the attention cost.
- Prompts are at most {MAX_TOKENS} tokens (the tokenizers' `model_max_length`); the world's longest caption has 17.
- {len(world.concepts)} concepts and 32x32 images: a measuring instrument for erasure, not an image model. Words
  outside the caption grammar use untrained token embeddings.
"""
    path = out / "README.md"
    path.write_text(text)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=OUTPUT)
    parser.add_argument("--quick", action="store_true", help="a few minutes, to check the script end to end")
    parser.add_argument("--eval-only", action="store_true")
    parser.add_argument("--card-only", action="store_true", help="rewrite README.md from training_stats.json")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--pool", type=int, default=30000)
    parser.add_argument("--steps", type=int, default=6000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--full-rows-steps", type=int, default=400,
                        help="the last steps see the pipeline's 256 zero T5 rows; earlier ones 24 (3x cheaper)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema-decay", type=float, default=0.998)
    parser.add_argument("--uncond-prob", type=float, default=0.1)
    parser.add_argument("--drop-prob", type=float, default=0.15)
    parser.add_argument("--checkpoint-every", type=int, default=250)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--eval-steps", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--resume-steps", type=int, default=0,
                        help="continue the saved model for this many steps (fresh warm-up, cosine and EMA)")
    args = parser.parse_args(argv)
    if args.quick:
        args.pool, args.steps, args.checkpoint_every, args.full_rows_steps = 512, 30, 10, 5
    return args


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    world = ConceptWorld()
    if args.card_only:
        logger.info("wrote %s", write_model_card(args.output, world))
        return
    if not args.eval_only:
        train(args, world)
    evaluate(args, world)


if __name__ == "__main__":
    main()
