"""The runtime's own commands: `convert` (file layouts), `generate` (images with membranes) and `list`
(the registry's short names)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch

from .bases import BASE_HELP, load_base_pipeline
from .families.base import FILE_LAYOUTS
from .membrane import PICKLE_SUFFIXES, Membrane
from .transport import METRICS, TransportConfig
from .utils import DTYPES

logger = logging.getLogger(__name__)


def read_any(path: Path) -> Membrane:
    """A membrane from safetensors, or from a reference pickle read with `weights_only=True`."""
    return Membrane.from_pickle(path) if path.suffix in PICKLE_SUFFIXES else Membrane.from_file(path)


def convert(source: Path, target: Path, to: str, base: str | None = None) -> Path:
    """Write `source` in the reference, diffusers (PEFT) or kohya/ComfyUI layout (see `FILE_LAYOUTS`).

    The layers are named against `base`'s denoiser (a model folder or Hub id; required for diffusion
    transformers), or against the SD 1.x / 2.x / XL UNet layout the membrane's shapes fit."""
    from .architectures import denoiser_for
    from .families import family_of

    membrane = read_any(source)
    if to == "reference" and base is None:
        return membrane.save(target)
    denoiser = denoiser_for(membrane, base)
    family = family_of(denoiser)
    return family.save(family.to_runtime_names(membrane, denoiser), target, denoiser, layout=to)


def _convert(args: argparse.Namespace) -> int:
    out = convert(Path(args.input), Path(args.output), args.to, args.base)
    logger.info("Wrote %s (%s layout).", out, args.to)
    return 0


def _generate(args: argparse.Namespace) -> int:
    pipe = load_base_pipeline(args.base, args.dtype, args.device)
    transport = TransportConfig(enabled=not args.no_transport, metric=args.metric, power=args.power)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    with pipe.spm_applied(args.spm, scale=args.scale, transport=transport):
        for index, prompt in enumerate(args.prompt):
            generator = torch.Generator(args.device).manual_seed(args.seed)
            images = pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                          num_images_per_prompt=args.num_images, generator=generator).images
            for j, image in enumerate(images):
                file = output / f"{index:04d}_{args.seed}_{j}.png"
                image.save(file)
                logger.info("%s <- %r", file, prompt)
    return 0


def registry_table(cache_dir: str | None = None) -> list[list[str]]:
    """One row per short name: name, concepts, base model, sources, and where it is cached (no network)."""
    from .hub import registry

    rows = [["name", "concepts", "base model", "source", "cached"]]
    for entry in registry().values():
        source = f"hub:{entry.repo_id}/{entry.filename}" + (f" drive:{entry.drive_id}" if entry.drive_id else "")
        cached = entry.cached_file(cache_dir)
        rows.append([entry.name, ", ".join(entry.concepts), entry.base_model, source, cached[1] if cached else "no"])
    return rows


def _list(args: argparse.Namespace) -> int:
    rows = registry_table(args.cache_dir)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:  # the command's output: stdout, for people and for `grep`
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    convert_parser = subparsers.add_parser(
        "convert", help="convert a membrane between the reference, diffusers (PEFT) and kohya/ComfyUI layouts")
    convert_parser.add_argument("input", help=".safetensors, or a reference .pt/.ckpt (read with weights_only=True)")
    convert_parser.add_argument("output", help="the .safetensors file to write")
    convert_parser.add_argument("--to", choices=FILE_LAYOUTS, required=True,
                                help="kohya: the original-checkpoint keys ComfyUI and kohya's trainers use for "
                                     "SD3 and Flux (q/k/v fused); for UNets the same as reference")
    convert_parser.add_argument("--base", help=f"{BASE_HELP}, whose denoiser names the layers (required for "
                                               "SD3/Flux/Sana; default: detect SD 1.x / 2.x / XL from the shapes)")
    convert_parser.set_defaults(handler=_convert)

    generate = subparsers.add_parser("generate", help="generate images with membranes")
    generate.add_argument("--base", required=True, help=BASE_HELP)
    generate.add_argument("--spm", action="append", default=[], help="membrane path, Hub id or short name (repeatable)")
    generate.add_argument("--prompt", action="append", required=True, help="repeatable")
    generate.add_argument("--scale", type=float, default=1.0)
    generate.add_argument("--no-transport", action="store_true", help="fixed gates instead of Facilitated Transport")
    generate.add_argument("--metric", default=TransportConfig.metric, choices=METRICS)
    generate.add_argument("--power", type=float, default=TransportConfig.power)
    generate.add_argument("--steps", type=int, default=30)
    generate.add_argument("--guidance", type=float, default=7.5)
    generate.add_argument("--num-images", type=int, default=1)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--dtype", choices=tuple(DTYPES), default="fp32")
    generate.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    generate.add_argument("--output", default="outputs/generate")
    generate.set_defaults(handler=_generate)

    listing = subparsers.add_parser("list", help="the registry's short names, their sources, and whether they are cached")
    listing.add_argument("--cache-dir", help="Hugging Face cache folder (default: huggingface_hub's)")
    listing.set_defaults(handler=_list)
