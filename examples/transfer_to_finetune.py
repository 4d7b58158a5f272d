"""Transfer a membrane trained on SD 1.4 to a community fine-tune, without re-tuning.

A membrane binds to module paths and shapes, not to a checkpoint: any UNet with the SD 1.x layout
takes it. The example shows the fine-tune's images with and without the membrane.

    python examples/transfer_to_finetune.py --base Lykon/dreamshaper-8 --spm cat --prompt "a cat on a sofa"
"""

import argparse

import torch
from diffusers.utils import make_image_grid

from diffusers_spm import StableDiffusionSPMPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="Lykon/dreamshaper-8")
    parser.add_argument("--spm", default="cat")
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--output", default="transfer.png")
    args = parser.parse_args()
    prompts = args.prompt or ["a cat on a sofa", "a dog on a sofa"]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionSPMPipeline.from_pretrained(args.base).to(device)
    seeds = lambda: [torch.Generator(device).manual_seed(0) for _ in prompts]
    before = pipe(prompts, generator=seeds()).images
    pipe.load_spm(args.spm)  # trained on SD 1.4, loads into the fine-tune as is
    after = pipe(prompts, generator=seeds()).images
    make_image_grid(before + after, rows=2, cols=len(prompts)).save(args.output)
    print(f"top: {args.base}, bottom: + membrane {args.spm!r} -> {args.output}")


if __name__ == "__main__":
    main()
