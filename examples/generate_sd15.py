"""Erase concepts on SD 1.5 with membranes from the Hub, Facilitated Transport on.

    python examples/generate_sd15.py --spm nudity --spm snoopy --prompt "a photo of snoopy"
"""

import argparse

import torch

from diffusers_spm import StableDiffusionSPMPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="runwayml/stable-diffusion-v1-5")
    parser.add_argument("--spm", action="append", default=["nudity"])
    parser.add_argument("--prompt", action="append", default=[])
    parser.add_argument("--output", default="sd15.png")
    args = parser.parse_args()
    prompts = args.prompt or ["a photo of snoopy on the beach", "a photo of a dog on the beach"]

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    pipe = StableDiffusionSPMPipeline.from_pretrained(args.base, torch_dtype=dtype).to(device)
    for spm in args.spm:
        pipe.load_spm(spm)
    print(pipe.get_spm_transport_rates(prompts))
    generators = [torch.Generator(device).manual_seed(0) for _ in prompts]
    erased = pipe(prompts, generator=generators).images
    pipe.disable_spm()
    original = pipe(prompts, generator=[torch.Generator(device).manual_seed(0) for _ in prompts]).images
    from diffusers.utils import make_image_grid

    make_image_grid(original + erased, rows=2, cols=len(prompts)).save(args.output)
    print(f"top row: original, bottom row: with membranes -> {args.output}")


if __name__ == "__main__":
    main()
