"""Erase a concept on Flux.1 from a membrane file, with per-prompt transport, beside an optional LoRA and
an optionally quantized transformer.

    python examples/generate_flux.py --spm snoopy_flux.safetensors --prompt "a photo of snoopy"
    python examples/generate_flux.py --spm snoopy_flux.safetensors --lora my_style.safetensors --int8

Membranes never need a merged copy of the transformer's weights (the default `stacked` memory mode),
so they run beside an 8-bit base (`--int8`, torchao) where fusing would be refused.
"""

import argparse

import torch

from diffusers_spm import FluxSPMPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default="black-forest-labs/FLUX.1-dev")
    parser.add_argument("--spm", required=True, help="file, folder or Hub repo id of a Flux membrane")
    parser.add_argument("--weight-name", default=None)
    parser.add_argument("--lora", default=None, help="an ordinary Flux LoRA to stack with the membrane")
    parser.add_argument("--int8", action="store_true", help="int8 weight-only transformer (torchao)")
    parser.add_argument("--prompt", default="a photo of snoopy")
    parser.add_argument("--output", default="flux.png")
    args = parser.parse_args()

    pipe = FluxSPMPipeline.from_pretrained(args.base, torch_dtype=torch.bfloat16)
    if args.int8:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_

        quantize_(pipe.transformer, Int8WeightOnlyConfig())
    pipe.to("cuda")
    if args.lora:
        pipe.load_lora_weights(args.lora, adapter_name="style")
    pipe.load_spm(args.spm, weight_name=args.weight_name)
    print("transport rates:", pipe.get_spm_transport_rates([args.prompt, "a red car on a road"]))
    image = pipe(args.prompt, num_inference_steps=28, guidance_scale=3.5,
                 generator=torch.Generator("cuda").manual_seed(0)).images[0]
    image.save(args.output)


if __name__ == "__main__":
    main()
