#!/usr/bin/env python
"""Write a tiny random-weight Stable Diffusion pipeline to a folder, offline.

The classes are the real ones SD 1.x/2.x use (UNet2DConditionModel, AutoencoderKL,
CLIPTextModel, CLIPTokenizer, DDPMScheduler); only the sizes are small, so the whole
trainer can be exercised on a CPU in seconds. The tokenizer is a genuine CLIP BPE
tokenizer whose vocabulary is the 256 byte symbols (plus their end-of-word forms and a
few merges), so it tokenizes any prompt without downloading SD's vocabulary.

    python examples/make_tiny_model.py --out work_dirs/tiny-sd
    python examples/make_tiny_model.py --out work_dirs/tiny-sd-v --prediction_type v_prediction
    python examples/make_tiny_model.py --out work_dirs/tiny-sd --single_file work_dirs/tiny-sd.safetensors
    python examples/make_tiny_model.py --family sdxl --out work_dirs/tiny-sdxl --single_file work_dirs/tiny-sdxl.safetensors

`--family sdxl` builds SDXL's architecture instead (StableDiffusionXLPipeline: two CLIP text encoders whose
penultimate hidden states are concatenated, the "text_time" added conditioning, EulerDiscreteScheduler).
"""
import argparse
import json
import os
import sys
import tempfile

import torch


def bytes_to_unicode():
    """CLIP's reversible byte -> printable unicode table (same construction as GPT-2/CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def write_tokenizer_files(folder, extra_words=("sks", "dog", "photo", "of", "a")):
    """A small but real CLIP BPE vocabulary: every byte symbol, its '</w>' form, and merges for a few words."""
    symbols = bytes_to_unicode()
    vocab_list = symbols + [s + "</w>" for s in symbols]
    merges = []
    for word in extra_words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            a, b = pieces[0], pieces[1]
            merges.append(f"{a} {b}")
            pieces = [a + b] + pieces[2:]
            if pieces[0] not in vocab_list:
                vocab_list.append(pieces[0])
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(dict.fromkeys(merges)) + "\n")
    return vocab


# SD 1.5's sizes (UNet 860M, text encoder 123M, VAE 84M parameters; 4.0 GiB in fp32) with random weights,
# for measuring memory at the scale users train at.
SD15_SIZE = dict(sample_size=64, unet_channels=(320, 640, 1280, 1280), cross_attention_dim=768,
                 vae_channels=(128, 256, 512, 512), layers_per_block=2, text_layers=12, text_vocab_size=49408)


def build_tiny_pipeline(prediction_type="epsilon", sample_size=32, seed=0, unet_channels=(32, 64),
                        cross_attention_dim=32, vae_channels=(32, 64), layers_per_block=1, text_layers=2,
                        text_vocab_size=None):
    """SD's architecture at toy sizes. The last UNet level has no attention, as in SD; the VAE downsamples
    2**(len(vae_channels) - 1) times (SD: 8x with four levels). SD15_SIZE gives SD 1.5's own sizes."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as tok_dir:
        vocab = write_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                                  model_max_length=77)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=text_vocab_size or len(vocab), hidden_size=cross_attention_dim,
        intermediate_size=4 * cross_attention_dim, num_hidden_layers=text_layers,
        num_attention_heads=max(4, cross_attention_dim // 64), max_position_embeddings=77,
        projection_dim=cross_attention_dim,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    levels = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(unet_channels), norm_num_groups=32, cross_attention_dim=cross_attention_dim,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1))
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
        layers_per_block=layers_per_block, norm_num_groups=32, sample_size=sample_size * 2 ** (len(vae_channels) - 1),
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels))
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False,
                              steps_offset=1, prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _tiny_tokenizer(**kwargs):
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tok_dir:
        vocab = write_tokenizer_files(tok_dir)
        tokenizer = CLIPTokenizer(os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
                                  model_max_length=77, **kwargs)
    return tokenizer, vocab


# SDXL base's sizes (UNet 2.57B, text encoders 123M + 695M, VAE 84M parameters; 13 GiB in fp32) with random
# weights, for measuring memory at the scale users train at.
SDXL_SIZE = dict(sample_size=128, unet_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                 attention_heads=(5, 10, 20), text_hidden_sizes=(768, 1280), text_layers=(12, 32), text_heads=(12, 20),
                 projection_dim=1280, addition_time_embed_dim=256, vae_channels=(128, 256, 512, 512),
                 vae_layers_per_block=2, text_vocab_size=49408)


def build_tiny_sdxl_pipeline(seed=0, prediction_type="epsilon", sample_size=8, unet_channels=(32, 64, 64),
                             transformer_layers_per_block=(1, 1, 2), attention_heads=(2, 4, 4),
                             text_hidden_sizes=(32, 64), projection_dim=48, addition_time_embed_dim=8,
                             vae_channels=(32, 32, 64, 64), layers_per_block=2, text_layers=2, text_heads=(4, 4),
                             vae_layers_per_block=1, text_vocab_size=None):
    """SDXL base's architecture at toy sizes. As in SDXL: three UNet levels, the first without attention,
    layers_per_block 2 (so the original-layout block numbers are SDXL's own), more transformer layers deeper
    down, linear attention projections, "text_time" added conditioning (6 micro-conditioning numbers, each
    embedded in addition_time_embed_dim, plus text_encoder_2's pooled projection), cross-attention width =
    text_encoder hidden + text_encoder_2 hidden, a VAE that downsamples 8x (four levels), Euler with SDXL's
    scheduler config. The two text encoders differ in width (as CLIP-L 768 / OpenCLIP-bigG 1280 do), which
    single-file loading also relies on to tell them apart. Images are sample_size * 8 pixels (64 by default)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, vocab = _tiny_tokenizer()
    tokenizer_2, _ = _tiny_tokenizer(pad_token="!")  # SDXL's tokenizer_2 pads with "!" (id 0), not <|endoftext|>
    hidden_1, hidden_2 = text_hidden_sizes

    layers = (text_layers, text_layers) if isinstance(text_layers, int) else text_layers

    def text_config(k, act, pad_id, projection):
        return CLIPTextConfig(
            vocab_size=text_vocab_size or len(vocab), hidden_size=text_hidden_sizes[k],
            intermediate_size=4 * text_hidden_sizes[k], num_hidden_layers=layers[k], num_attention_heads=text_heads[k],
            max_position_embeddings=77, hidden_act=act, projection_dim=projection,
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=pad_id)

    text_encoder = CLIPTextModel(text_config(0, "quick_gelu", vocab["<|endoftext|>"], hidden_1))
    text_encoder_2 = CLIPTextModelWithProjection(text_config(1, "gelu", tokenizer_2.pad_token_id, projection_dim))
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=layers_per_block,
        block_out_channels=tuple(unet_channels), norm_num_groups=32,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=tuple(transformer_layers_per_block), attention_head_dim=tuple(attention_heads),
        use_linear_projection=True, cross_attention_dim=hidden_1 + hidden_2,
        addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * addition_time_embed_dim + projection_dim)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(vae_channels),
        layers_per_block=vae_layers_per_block, norm_num_groups=32,
        sample_size=sample_size * 2 ** (len(vae_channels) - 1), scaling_factor=0.13025, force_upcast=True,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels))
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading",
                                       interpolation_type="linear", use_karras_sigmas=False,
                                       prediction_type=prediction_type)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl"],
                        help="sd: SD 1.x architecture (StableDiffusionPipeline); sdxl: SDXL base architecture.")
    parser.add_argument("--out", required=True, help="Folder to write the diffusers-format pipeline to.")
    parser.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction"],
                        help="epsilon like SD 1.5 / SD 2.1-base, v_prediction like SD 2.1 768.")
    parser.add_argument("--sample_size", type=int, default=None,
                        help="UNet latent size; images are 2x this for sd (default 32), 8x for sdxl (default 8).")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    parser.add_argument("--single_file", default=None,
                        help="Also write the pipeline as one original-layout (A1111/ComfyUI style) .safetensors file.")
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dreambooth.quiet import quiet_libraries
    quiet_libraries()
    if args.family == "sdxl":
        pipe = build_tiny_sdxl_pipeline(args.seed, args.prediction_type, args.sample_size or 8)
    else:
        pipe = build_tiny_pipeline(args.prediction_type, args.sample_size or 32, args.seed)
    pipe.save_pretrained(args.out)
    if args.single_file:
        from single_file import write_original_layout_checkpoint
        write_original_layout_checkpoint(pipe, args.single_file)
    print(f"wrote tiny {'SDXL' if args.family == 'sdxl' else 'SD'} pipeline ({args.prediction_type}) to {args.out}"
          + (f" and {args.single_file}" if args.single_file else ""))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
