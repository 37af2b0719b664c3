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

    python examples/make_tiny_model.py --family sd3 --out work_dirs/tiny-sd3 [--no_t5]
    python examples/make_tiny_model.py --family flux --out work_dirs/tiny-flux [--schnell]

`--family sd3` and `--family flux` build the flow-matching transformers (StableDiffusion3Pipeline: MMDiT, two CLIP
encoders and an optional T5 encoder; FluxPipeline: Flux.1-dev, or -schnell, with CLIP and T5 encoders), each with a
16-channel VAE and FlowMatchEulerDiscreteScheduler. Their T5 tokenizer is a small Unigram vocabulary built offline
with the `tokenizers` library. Both work at any multiple of 16 pixels; 64 is the tiny size.
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


# T5's sentencepiece vocabulary is 32k pieces; the tiny one covers ASCII letters, digits and punctuation (each
# alone and after the word-start marker "▁") plus some whole words, so any ASCII prompt tokenizes without <unk>.
T5_WORDS = ("a", "photo", "of", "sks", "dog", "cat", "in", "the", "on", "with", "and", "an", "at", "picture",
            "painting", "style", "person", "man", "woman", "beach", "city", "red", "blue", "green", "white", "black")


def build_t5_tokenizer(words=T5_WORDS, model_max_length=512):
    """A real T5 tokenizer (a `tokenizers` Unigram model, as T5TokenizerFast is), built offline: ids 0/1/2 are
    <pad>/</s>/<unk> as in T5, a Metaspace pre-tokenizer marks word starts with "▁", and the post-processor
    appends </s> to every sequence. Whole words score higher than their spelling, so "dog" is one piece "▁dog";
    other words fall back to single characters. No sentinel <extra_id_*> tokens (SD3/Flux never use them)."""
    import string

    from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5TokenizerFast

    chars = string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
    pieces = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -3.0}
    for w in words:
        pieces.setdefault("▁" + w, -5.0)
    for c in chars:
        pieces.setdefault("▁" + c, -9.0)
        pieces.setdefault(c, -10.0)
    tok = Tokenizer(Unigram(list(pieces.items()), unk_id=2, byte_fallback=False))
    # T5's own normalizer is sentencepiece's precompiled NFKC map followed by collapsing runs of spaces.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " "),
                                           normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    tok.post_processor = processors.TemplateProcessing(
        single=["$A", "</s>"], pair=["$A", "</s>", "$B", "</s>"], special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=model_max_length,
                           pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def _tiny_t5_encoder(vocab_size, d_model, layers, heads):
    """T5 v1.1's encoder (as T5-XXL in SD3/Flux: gated-GELU feed-forward, untied embeddings) at toy sizes."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(
        vocab_size=vocab_size, d_model=d_model, d_kv=d_model // heads, d_ff=2 * d_model, num_layers=layers,
        num_heads=heads, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, is_encoder_decoder=False, use_cache=False,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def _as_loaded(pipe):
    """Eval mode for every model, as from_pretrained leaves them: freshly constructed modules are in train mode,
    and T5 keeps its config's dropout_rate 0.1 (as T5-XXL's), so otherwise two identical calls would differ."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe


def _tiny_flow_vae(vae_channels, layers_per_block, sample_size, scaling_factor, shift_factor):
    """SD3's and Flux's VAE layout: 16 latent channels, no quant_conv/post_quant_conv, a latent shift as well as a
    scale; downsamples 2**(len(vae_channels) - 1) times (8x with four levels, as the real ones)."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=tuple(vae_channels),
        layers_per_block=layers_per_block, norm_num_groups=min(32, min(vae_channels)), sample_size=sample_size,
        down_block_types=("DownEncoderBlock2D",) * len(vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(vae_channels),
        scaling_factor=scaling_factor, shift_factor=shift_factor, use_quant_conv=False, use_post_quant_conv=False)


def build_tiny_sd3_pipeline(seed=0, with_t5=True, sample_size=8, text_hidden_sizes=(16, 32), text_heads=(2, 4),
                            text_layers=2, t5_d_model=64, t5_layers=2, t5_heads=4, num_layers=2,
                            attention_head_dim=8, num_attention_heads=4, pos_embed_max_size=32,
                            vae_channels=(32, 32, 64, 64), vae_layers_per_block=1):
    """SD3 (medium)'s architecture at toy sizes (StableDiffusion3Pipeline). As in SD3: an MMDiT
    (SD3Transformer2DModel, 2x2 patches of 16 latent channels, joint attention over text and image tokens, the
    last block context_pre_only); two CLIPTextModelWithProjection (CLIP-L-like then a wider CLIP-G-like, each
    projection as wide as its hidden state) whose penultimate hidden states are concatenated and zero-padded to the
    T5 width, so joint_attention_dim = t5_d_model >= the two CLIP widths together (768 + 1280 < 4096 in SD3), and
    whose pooled projections are concatenated (pooled_projection_dim = their sum); a T5 encoder (optional, as in
    SD3: with_t5=False builds text_encoder_3=None/tokenizer_3=None and the pipeline feeds zeros in its place); a
    16-channel VAE with SD3's scale/shift; FlowMatchEulerDiscreteScheduler(shift=3.0) as SD3's config.
    Images are sample_size * 8 pixels by default (64); any multiple of 16 (VAE 8x times patch 2) works up to
    pos_embed_max_size * 16 (512)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tokenizer, vocab = _tiny_tokenizer()
    tokenizer_2, _ = _tiny_tokenizer(pad_token="!")  # as SDXL's, SD3's CLIP-G tokenizer pads with "!" (id 0)
    if sum(text_hidden_sizes) > t5_d_model:
        raise ValueError(f"the CLIP widths {text_hidden_sizes} must fit in the T5 width {t5_d_model}")

    def clip(k, act, pad_id):
        return CLIPTextModelWithProjection(CLIPTextConfig(
            vocab_size=len(vocab), hidden_size=text_hidden_sizes[k], intermediate_size=4 * text_hidden_sizes[k],
            num_hidden_layers=text_layers, num_attention_heads=text_heads[k], max_position_embeddings=77,
            hidden_act=act, projection_dim=text_hidden_sizes[k],
            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"], pad_token_id=pad_id))

    text_encoder = clip(0, "quick_gelu", vocab["<|endoftext|>"])
    text_encoder_2 = clip(1, "gelu", tokenizer_2.pad_token_id)
    tokenizer_3 = text_encoder_3 = None
    if with_t5:
        tokenizer_3 = build_t5_tokenizer()
        text_encoder_3 = _tiny_t5_encoder(len(tokenizer_3), t5_d_model, t5_layers, t5_heads)
    inner_dim = num_attention_heads * attention_head_dim
    transformer = SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=16, out_channels=16, num_layers=num_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_d_model, caption_projection_dim=inner_dim,
        pooled_projection_dim=sum(text_hidden_sizes), pos_embed_max_size=pos_embed_max_size)
    vae = _tiny_flow_vae(vae_channels, vae_layers_per_block, sample_size * 2 ** (len(vae_channels) - 1),
                         scaling_factor=1.5305, shift_factor=0.0609)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return _as_loaded(StableDiffusion3Pipeline(
        transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3))


def build_tiny_flux_pipeline(seed=0, guidance_embeds=True, text_hidden_size=32, text_heads=4, text_layers=2,
                             t5_d_model=64, t5_layers=2, t5_heads=4, num_layers=1, num_single_layers=1,
                             attention_head_dim=16, num_attention_heads=2, axes_dims_rope=(4, 6, 6),
                             vae_channels=(32, 32, 64, 64), vae_layers_per_block=1):
    """Flux.1's architecture at toy sizes (FluxPipeline). As in Flux: FluxTransformer2DModel with double-stream
    (transformer_blocks) and single-stream (single_transformer_blocks) blocks, 3-axis rotary positions whose axes
    dims sum to attention_head_dim (Flux: 16 + 56 + 56 = 128), in_channels 64 = 16 latent channels packed 2x2
    by the pipeline (so patch_size 1); the CLIPTextModel's pooled output (pooled_projection_dim = its width) and
    the T5 encoder's hidden states (joint_attention_dim = t5_d_model); guidance_embeds=True is Flux.1-dev's
    guidance-distilled conditioning, False is schnell's. VAE with Flux's scale/shift; FlowMatchEulerDiscrete with
    Flux-dev's config (resolution-dependent shift) or, for schnell, shift 1.0 without dynamic shifting.
    Any multiple of 16 pixels works (VAE 8x times the 2x2 packing); 64 is the tiny size. FluxPipeline's own
    default is 1024 (a fixed 128 latent), so pass height/width."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if sum(axes_dims_rope) != attention_head_dim or any(d % 2 for d in axes_dims_rope):
        raise ValueError(f"axes_dims_rope {axes_dims_rope} must be even and sum to {attention_head_dim}")
    torch.manual_seed(seed)
    tokenizer, vocab = _tiny_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=text_hidden_size, intermediate_size=4 * text_hidden_size,
        num_hidden_layers=text_layers, num_attention_heads=text_heads, max_position_embeddings=77,
        hidden_act="quick_gelu", projection_dim=text_hidden_size,
        bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
        pad_token_id=vocab["<|endoftext|>"]))
    tokenizer_2 = build_t5_tokenizer()
    text_encoder_2 = _tiny_t5_encoder(len(tokenizer_2), t5_d_model, t5_layers, t5_heads)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=attention_head_dim, num_attention_heads=num_attention_heads,
        joint_attention_dim=t5_d_model, pooled_projection_dim=text_hidden_size, guidance_embeds=guidance_embeds,
        axes_dims_rope=tuple(axes_dims_rope))
    vae = _tiny_flow_vae(vae_channels, vae_layers_per_block, 64, scaling_factor=0.3611, shift_factor=0.1159)
    if guidance_embeds:  # Flux.1-dev's scheduler config
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    else:  # Flux.1-schnell's
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15,
            base_image_seq_len=256, max_image_seq_len=4096)
    return _as_loaded(FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                                   text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, transformer=transformer))

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="sd", choices=["sd", "sdxl", "sd3", "flux"],
                        help="sd: SD 1.x architecture (StableDiffusionPipeline); sdxl: SDXL base architecture; "
                             "sd3: SD3 medium (StableDiffusion3Pipeline); flux: Flux.1 (FluxPipeline; dev unless "
                             "--schnell).")
    parser.add_argument("--out", required=True, help="Folder to write the diffusers-format pipeline to.")
    parser.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                        help="sd/sdxl only (default epsilon): epsilon like SD 1.5 / SD 2.1-base, v_prediction like "
                             "SD 2.1 768. sd3/flux are flow-matching models and have none.")
    parser.add_argument("--sample_size", type=int, default=None,
                        help="UNet latent size; images are 2x this for sd (default 32), 8x for sdxl (default 8). "
                             "sd3: the transformer's sample_size, images 8x (default 8). Not for flux.")
    parser.add_argument("--seed", type=int, default=0, help="Seed for the random weights.")
    parser.add_argument("--single_file", default=None,
                        help="Also write the pipeline as one original-layout (A1111/ComfyUI style) .safetensors file "
                             "(sd/sdxl only).")
    parser.add_argument("--no_t5", action="store_true",
                        help="sd3 only: no T5 encoder (text_encoder_3 and tokenizer_3 are None, as SD3 allows); "
                             "load it with from_pretrained(..., text_encoder_3=None, tokenizer_3=None).")
    parser.add_argument("--schnell", action="store_true",
                        help="flux only: Flux.1-schnell (no guidance embedding; scheduler shift 1.0 without "
                             "dynamic shifting) instead of Flux.1-dev.")
    args = parser.parse_args(argv)
    flow = args.family in ("sd3", "flux")
    if flow and args.single_file:
        parser.error(f"--single_file is only written for --family sd/sdxl, not {args.family}")
    if flow and args.prediction_type:
        parser.error(f"--prediction_type is for --family sd/sdxl; {args.family} is a flow-matching model")
    if args.no_t5 and args.family != "sd3":
        parser.error("--no_t5 is for --family sd3 (Flux needs its T5 encoder)")
    if args.schnell and args.family != "flux":
        parser.error("--schnell is for --family flux")
    if args.family == "flux" and args.sample_size is not None:
        parser.error("--sample_size is not used by --family flux (FluxTransformer2DModel has no sample size)")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from dreambooth.quiet import quiet_libraries
    quiet_libraries()
    if args.family == "sd3":
        pipe = build_tiny_sd3_pipeline(args.seed, with_t5=not args.no_t5, sample_size=args.sample_size or 8)
        pipe.save_pretrained(args.out)
        print(f"wrote tiny SD3 pipeline ({'without' if args.no_t5 else 'with'} T5) to {args.out}")
        return
    if args.family == "flux":
        pipe = build_tiny_flux_pipeline(args.seed, guidance_embeds=not args.schnell)
        pipe.save_pretrained(args.out)
        print(f"wrote tiny Flux.1-{'schnell' if args.schnell else 'dev'} pipeline to {args.out}")
        return
    args.prediction_type = args.prediction_type or "epsilon"
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
