"""Combine membranes with an ordinary style LoRA: both stack, each keeps its own controls.

    python examples/membranes_with_style_lora.py --lora some/style-lora --spm nudity
"""

import argparse

import torch

from diffusers_spm import StableDiffusionSPMPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="runwayml/stable-diffusion-v1-5")
    parser.add_argument("--lora", required=True, help="a diffusers/kohya LoRA (file, folder or Hub id)")
    parser.add_argument("--lora-scale", type=float, default=0.8)
    parser.add_argument("--spm", action="append", default=["nudity"])
    parser.add_argument("--prompt", default="a portrait of a woman, oil painting")
    parser.add_argument("--output", default="style_and_membranes.png")
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = StableDiffusionSPMPipeline.from_pretrained(args.base).to(device)
    pipe.load_lora_weights(args.lora, adapter_name="style")
    pipe.set_adapters(["style"], [args.lora_scale])
    for spm in args.spm:
        pipe.load_spm(spm)
    pipe(args.prompt, generator=torch.Generator(device).manual_seed(0)).images[0].save(args.output)
    pipe.unload_spm()          # the style LoRA stays loaded
    print(f"saved {args.output}; LoRA adapters still active: {pipe.get_active_adapters()}")


if __name__ == "__main__":
    main()
