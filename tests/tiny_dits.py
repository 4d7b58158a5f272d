"""Tiny diffusion-transformer pipelines (SD3, Flux, Sana) built offline from configs, random weights.

Shapes follow diffusers' own pipeline tests; the T5 and Gemma tokenizers are real tokenizer classes
over small vocabularies built here (Unigram, and BPE trained on the test words), so nothing downloads.
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderDC,
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from conftest import TOKENIZER_DIR

WORDS = ("a photo of snoopy red car on road painting in the style van gogh dog cat blue green house tree "
         "portrait man woman nude cartoon beagle crimson").split()


def t5_tokenizer(max_length: int = 32) -> T5Tokenizer:
    """A T5 tokenizer whose vocabulary is the test words, then single letters for anything else."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in dict.fromkeys(WORDS)]
    vocab += [("\u2581", -5.0)] + [(c, -8.0) for c in letters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


def clip_text_config(**overrides) -> CLIPTextConfig:
    settings = dict(bos_token_id=49406, eos_token_id=49407, pad_token_id=1, hidden_size=32, intermediate_size=37,
                    layer_norm_eps=1e-05, num_attention_heads=4, num_hidden_layers=2, vocab_size=49408,
                    max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
    settings.update(overrides)
    return CLIPTextConfig(**settings)


def t5_encoder(d_model: int) -> T5EncoderModel:
    config = T5Config(vocab_size=64, d_model=d_model, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0)
    return T5EncoderModel(config).eval()  # built, not loaded: switch dropout off as `from_pretrained` does


def tiny_vae(latent_channels: int, seed: int, **config) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035, **config)


def tiny_sd3_pipeline(seed: int = 0, with_t5: bool = True, cls=StableDiffusion3Pipeline, latent_channels: int = 4):
    """SD3/SD3.5-shaped: CLIP-L + CLIP-G (pooled 32 + 32) and optional T5, joint width 64, two joint blocks
    (the last one context-pre-only), the first with SD3.5's dual attention. `latent_channels`: SD3's
    16 for its inpaint pipeline, which assumes them."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(sample_size=32, patch_size=1, in_channels=latent_channels, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                        joint_attention_dim=64, pooled_projection_dim=64, out_channels=latent_channels,
                                        dual_attention_layers=(0,), qk_norm="rms_norm")
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(clip_text_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip_text_config())
    torch.manual_seed(seed + 3)
    text_encoder_3 = t5_encoder(64) if with_t5 else None
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    pipe = cls(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
               vae=tiny_vae(latent_channels, seed), text_encoder=text_encoder, tokenizer=tokenizer,
               text_encoder_2=text_encoder_2, tokenizer_2=tokenizer, text_encoder_3=text_encoder_3,
               tokenizer_3=t5_tokenizer() if with_t5 else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_pipeline(seed: int = 0, cls=FluxPipeline):
    """Flux.1-shaped: pooled CLIP-L (32) and T5 (32), one double- and two single-stream blocks."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=2,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(clip_text_config())
    torch.manual_seed(seed + 2)
    text_encoder_2 = t5_encoder(32)
    tokenizer = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, model_max_length=77)
    pipe = cls(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(1, seed),
               text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
               tokenizer_2=t5_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def gemma_tokenizer(max_length: int = 64) -> GemmaTokenizerFast:
    """A Gemma tokenizer whose BPE is trained on the test words (letters for anything else)."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    trainer = trainers.BpeTrainer(special_tokens=["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"], vocab_size=200,
                                  show_progress=False, initial_alphabet=list("abcdefghijklmnopqrstuvwxyz"))
    tokenizer.train_from_iterator([" ".join(WORDS)] * 3, trainer)
    return GemmaTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>",
                              unk_token="<unk>", mask_token="<mask>", model_max_length=max_length)


def tiny_sana_pipeline(seed: int = 0, cls=SanaPipeline):
    """Sana-shaped: a one-layer Gemma-2 (8 wide), one linear-attention block with cross-attention and GLUMBConv."""
    tokenizer = gemma_tokenizer()
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(patch_size=1, in_channels=4, out_channels=4, num_layers=1,
                                         num_attention_heads=2, attention_head_dim=4, num_cross_attention_heads=2,
                                         cross_attention_head_dim=4, cross_attention_dim=8, caption_channels=8,
                                         sample_size=32)
    torch.manual_seed(seed + 1)
    text_encoder = Gemma2Model(Gemma2Config(head_dim=16, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                                            num_hidden_layers=1, num_key_value_heads=2, vocab_size=len(tokenizer),
                                            pad_token_id=0)).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderDC(in_channels=3, latent_channels=4, attention_head_dim=2,
                        encoder_block_types=("ResBlock", "EfficientViTBlock"),
                        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
                        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)),
                        decoder_qkv_multiscales=((), (5,)), encoder_layers_per_block=(1, 1),
                        decoder_layers_per_block=[1, 1], downsample_block_type="conv",
                        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
                        scaling_factor=0.41407)
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
               scheduler=FlowMatchEulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def in_blocks(module: torch.nn.Module, path: str) -> bool:
    """The Linears of a DiT's blocks: what Flux users quantize."""
    return isinstance(module, torch.nn.Linear) and "blocks" in path


def quantize_torchao(transformer: torch.nn.Module) -> None:
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    quantize_(transformer, Int8WeightOnlyConfig(), filter_fn=in_blocks)


def quantize_bitsandbytes(transformer: torch.nn.Module, bits: int) -> None:
    """The blocks' Linears as bitsandbytes layers quantized on the CPU: the layers diffusers'
    `BitsAndBytesConfig` puts in, built by hand because that config asks for a GPU."""
    import bitsandbytes as bnb

    for path, module in [(p, m) for p, m in transformer.named_modules() if in_blocks(m, p)]:
        shape, weight = (module.in_features, module.out_features, module.bias is not None), module.weight.data.clone()
        if bits == 4:
            layer = bnb.nn.Linear4bit(*shape, compute_dtype=torch.float32, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
            # bitsandbytes 0.50 repacks 4-bit weights for AVX512-BF16 CPUs at the first eval-mode forward,
            # which fails on layers narrower than its 64-value block (these tiny models' 32): keep the
            # portable kernel, the same on every CPU
            layer.support_avx512bf16_for_cpu = False
        else:
            layer = bnb.nn.Linear8bitLt(*shape, has_fp16_weights=False)
            layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data.clone(), requires_grad=False)
        layer = layer.to("cpu")  # `.to` quantizes the weight
        assert layer.weight.dtype in (torch.uint8, torch.int8)
        parent, _, name = path.rpartition(".")
        setattr(transformer.get_submodule(parent), name, layer)


def quantized_values(weight: torch.Tensor) -> torch.Tensor:
    """What a quantized weight stores, comparable with `torch.equal` (torchao's subclass dequantized)."""
    return weight.dequantize() if hasattr(weight, "dequantize") else weight.data


# name -> (the library to skip without, a function quantizing a DiT's blocks in place); all run on a CPU
QUANTIZERS = {
    "torchao int8 weight-only": ("torchao", quantize_torchao),
    "bitsandbytes 8-bit": ("bitsandbytes", lambda transformer: quantize_bitsandbytes(transformer, 8)),
    "bitsandbytes 4-bit nf4": ("bitsandbytes", lambda transformer: quantize_bitsandbytes(transformer, 4)),
}
