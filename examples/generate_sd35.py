"""Erase a concept on SD3.5 from a membrane file: the same API as on SD 1.x; the membrane must be made
for SD3/SD3.5's transformer (diffusers, reference or kohya/ComfyUI layout).

    python examples/generate_sd35.py --spm snoopy_sd35.safetensors --prompt "a photo of snoopy"

T5 is optional for transport and generation alike: `--no-t5` loads the pipeline with
`text_encoder_3=None` (less memory; transport reads CLIP-L, CLIP-G and zeros for T5).
"""

import argparse

import torch

from diffusers_spm import StableDiffusion3SPMPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="stabilityai/stable-diffusion-3.5-medium")
    parser.add_argument("--spm", required=True, help="file, folder or Hub repo id of an SD3/SD3.5 membrane")
    parser.add_argument("--weight-name", default=None)
    parser.add_argument("--prompt", default="a photo of snoopy")
    parser.add_argument("--no-t5", action="store_true")
    parser.add_argument("--output", default="sd35.png")
    args = parser.parse_args()

    extra = {"text_encoder_3": None, "tokenizer_3": None} if args.no_t5 else {}
    pipe = StableDiffusion3SPMPipeline.from_pretrained(args.base, torch_dtype=torch.bfloat16, **extra).to("cuda")
    pipe.load_spm(args.spm, weight_name=args.weight_name)
    print("transport rates:", pipe.get_spm_transport_rates([args.prompt, "a red car on a road"]))
    image = pipe(args.prompt, num_inference_steps=28, guidance_scale=4.5,
                 generator=torch.Generator("cuda").manual_seed(0)).images[0]
    image.save(args.output)


if __name__ == "__main__":
    main()
