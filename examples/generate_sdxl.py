"""Membranes on SDXL: the same API; the membrane must be trained for SDXL (722 layers).

    python examples/generate_sdxl.py --spm org/sdxl-membranes --weight-name van_gogh.safetensors
"""

import argparse

import torch

from diffusers_spm import StableDiffusionXLSPMPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", default="stabilityai/stable-diffusion-xl-base-1.0")
    parser.add_argument("--spm", required=True, help="Hub repo id, folder or file of an SDXL membrane")
    parser.add_argument("--weight-name", default=None)
    parser.add_argument("--prompt", default="a starry night over a village, painting by van gogh")
    parser.add_argument("--output", default="sdxl.png")
    args = parser.parse_args()

    pipe = StableDiffusionXLSPMPipeline.from_pretrained(args.base, torch_dtype=torch.float16, variant="fp16").to("cuda")
    pipe.load_spm(args.spm, weight_name=args.weight_name)
    print(pipe.get_spm_transport_rates([args.prompt]))
    pipe(args.prompt, generator=torch.Generator("cuda").manual_seed(0)).images[0].save(args.output)


if __name__ == "__main__":
    main()
