"""Flux.1 dev and schnell (FluxPipeline): a FluxTransformer2DModel (double- then single-stream blocks, 3-axis rotary
positions) over 16-channel latents packed 2x2 into tokens, with image and text position ids; conditioned on T5-XXL's
hidden states and CLIP-L's pooled output; trained by flow matching. Flux.1-dev is guidance-distilled (the
transformer takes a guidance value, --guidance_scale, 3.5 by default as diffusers' script); schnell is not (its
config says guidance_embeds false) and reads at most 256 T5 tokens."""
import json
import os

from ..errors import UsageError
from .flow import FlowFamily


def _has_guidance(args):
    """Whether the base is Flux.1-dev (a guidance embedding) rather than schnell, read before any weights load:
    a folder's transformer/config.json, a hub id's (a small download, as for model_index.json), or a single
    file's tensor names (BFL's guidance_in.*, or diffusers' guidance_embedder.*)."""
    from .base import ModelSource, loaded
    source = ModelSource.from_flags(args)
    if os.path.isfile(source.path):
        from . import _single_file_keys
        return any(k.startswith(("guidance_in.", "model.diffusion_model.guidance_in.")) or ".guidance_embedder." in k
                   for k in _single_file_keys(source.path))
    local = os.path.join(source.path, "transformer", "config.json")
    if os.path.isfile(local):
        try:
            with open(local, encoding="utf-8") as f:
                return bool(json.load(f).get("guidance_embeds", True))
        except (OSError, ValueError):
            return True  # unreadable: loading names the file in one line
    from diffusers import FluxTransformer2DModel
    config = loaded(source.path, "transformer config", FluxTransformer2DModel.load_config, source.path,
                    subfolder="transformer", revision=source.revision, cache_dir=source.cache_dir)
    return bool(config.get("guidance_embeds", True))


class Flux(FlowFamily):
    name = "Flux.1"
    pipeline_class_name = "FluxPipeline"
    pipeline_class_names = ("FluxPipeline",)
    default_resolution = 512  # diffusers' Flux script default (Flux.1 itself is trained at 1024)
    denoiser_class = "FluxTransformer2DModel"
    # diffusers' Flux script: the double blocks' attention and feed-forward layers (the single blocks' attn.to_q/k/v
    # match the same names; their proj_mlp/proj_out are not targeted)
    default_lora_targets = ("attn.to_k,attn.to_q,attn.to_v,attn.to_out.0,attn.add_k_proj,attn.add_q_proj,"
                            "attn.add_v_proj,attn.to_add_out,ff.net.0.proj,ff.net.2,ff_context.net.0.proj,"
                            "ff_context.net.2")
    text_encoder_names = ("text_encoder", "text_encoder_2")
    text_encoder_classes = ("CLIPTextModel", "T5EncoderModel")
    tokenizer_names = ("tokenizer", "tokenizer_2")
    t5_name = "text_encoder_2"
    text_encoder_lora_targets = (("q_proj", "k_proj", "v_proj", "out_proj"), None)  # CLIP only; T5 frozen
    embedding_file_keys = ("clip_l", "t5")  # diffusers' advanced Flux script's embeddings file
    kohya_text_prefixes = ("lora_te1_", "lora_te2_")
    unused_text_encoder_layers = False  # CLIP's pooled output reads its last layer
    flags = FlowFamily.flags + ("guidance_scale", "enable_t5_ti")
    flag_specs = dict(FlowFamily.flag_specs,
                      guidance_scale=dict(type=float, help="Flux.1-dev: the guidance value the transformer is "
                                          "given in training (default 3.5, as diffusers' Flux script); refused for "
                                          "schnell, which has no guidance input."),
                      enable_t5_ti=dict(action="store_true", help="Flux.1 pivotal tuning: new token rows in T5 too "
                                        "(diffusers' advanced Flux flag; with --train_text_encoder_ti)."))
    flag_defaults = dict(FlowFamily.flag_defaults, weighting_scheme="none", max_sequence_length=512)
    common_defaults = {"learning_rate": 1e-4, "text_encoder_lr": 5e-6, "adam_weight_decay": 1e-4,  # diffusers'
                       "adam_weight_decay_text_encoder": 1e-3}                                    # Flux script
    card_tags = ("flux", "flux-diffusers")
    samples_with_guidance = False  # dev is guidance-distilled (a guidance input), schnell needs none: one branch
    card_gpu_dtype = "bfloat16"  # Flux.1 overflows fp16 (black images); BFL and diffusers run it in bf16

    @classmethod
    def defaults(cls, args):
        """dev: guidance 3.5, 512 T5 tokens; schnell: no guidance, 256 tokens (as its pipeline)."""
        schnell = not _has_guidance(args)
        return dict(super().defaults(args), max_sequence_length=256 if schnell else 512,
                    **({} if schnell else {"guidance_scale": 3.5}))

    @classmethod
    def check_flags(cls, args, t5_positions=None):
        """schnell (no guidance embedding) takes no --guidance_scale and at most 256 T5 tokens."""
        schnell = not _has_guidance(args)
        if schnell and args.guidance_scale is not None:
            raise UsageError(f"--guidance_scale: {args.pretrained_model_name_or_path} is Flux.1-schnell, which has "
                             "no guidance input (only Flux.1-dev is guidance-distilled); drop the flag")
        if args.enable_t5_ti and not args.train_text_encoder_ti:
            raise UsageError("--enable_t5_ti adds T5 rows to pivotal tuning; it needs --train_text_encoder_ti")
        if schnell and args.max_sequence_length > 256:
            raise UsageError(f"--max_sequence_length {args.max_sequence_length} is above 256, the most "
                             "Flux.1-schnell takes; use 256 or less")
        super().check_flags(args, t5_positions)

    def schnell(self):
        return not self.denoiser.config.guidance_embeds

    def t5_max_length(self):
        return self.options.get("max_sequence_length") or (256 if self.schnell() else 512)

    @classmethod
    def pivotal_text_encoders(cls, options):
        """CLIP; T5 too with --enable_t5_ti (diffusers' advanced Flux script)."""
        return [0, 1] if options.get("enable_t5_ti") else [0]

    def size_multiple(self):
        """The VAE's downsampling times the 2x2 packing (Flux: 8 x 2 = 16)."""
        return self.vae_scale() * 2

    @classmethod
    def sampling_size_multiple(cls, pipe):
        return pipe.vae_scale_factor * 2

    @classmethod
    def sampling_flag_problem(cls, pipe, negative_prompt, guidance_given, guidance):
        """FluxPipeline ignores a negative prompt (without its true_cfg_scale), and schnell any guidance."""
        if negative_prompt is not None:
            return ("--negative_prompt: Flux.1 takes no negative prompt (its guidance is distilled into the model, "
                    "and FluxPipeline ignores one); leave it out")
        if guidance_given and not pipe.transformer.config.guidance_embeds:
            return (f"--guidance_scale {guidance_given:g}: Flux.1-schnell takes no guidance (it was distilled to sample "
                    "without it, and its pipeline ignores the value); leave --guidance_scale out")
        return None

    def encode(self, tokens, use_attention_mask=False):
        """As FluxPipeline.encode_prompt: CLIP's pooled output, T5's last hidden state (--max_sequence_length)."""
        (clip_tokens, t5_tokens), (clip, t5) = tokens, self.text_encoders
        pooled = clip(clip_tokens["input_ids"].to(clip.device), output_hidden_states=False).pooler_output
        hidden = t5(t5_tokens["input_ids"].to(t5.device))[0]
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def conditioning(self, encoded, batch):
        import torch
        hidden = encoded["encoder_hidden_states"]
        return {"encoder_hidden_states": hidden, "pooled_projections": encoded["pooled_projections"].to(hidden.dtype),
                "txt_ids": torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=hidden.dtype)}

    def denoise(self, denoiser, noisy, timesteps, conditioning, batch):
        """As diffusers' Flux script: latents packed 2x2 into tokens with their (0, row, col) ids, the timestep
        in [0, 1], the guidance value where the model takes one; the output unpacked to latents."""
        import torch
        from diffusers import FluxPipeline
        n, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, n, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(n, h // 2, w // 2, noisy.device, noisy.dtype)
        guidance = None
        if self.denoiser.config.guidance_embeds:  # the family's own (unwrapped) transformer says which Flux it is
            scale = self.options.get("guidance_scale")
            guidance = torch.full((n,), 3.5 if scale is None else float(scale), device=noisy.device)
        output = denoiser(hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, img_ids=img_ids,
                          return_dict=False, **conditioning)[0]
        scale = self.vae_scale()
        return FluxPipeline._unpack_latents(output, h * scale, w * scale, scale)

    def decodable_latents(self, pipe, latents, kwargs):
        """FluxPipeline(output_type="latent") returns the packed tokens: unpacked to [N, 16, h, w] here."""
        return pipe._unpack_latents(latents, kwargs["height"], kwargs["width"], pipe.vae_scale_factor)

    def sampling_embeddings(self, pipe, prompt):
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=pipe.device,
                                                      num_images_per_prompt=1,
                                                      max_sequence_length=self.t5_max_length())
        return {"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled}

    def generate(self, pipe, **kwargs):
        if self.schnell():
            kwargs.setdefault("guidance_scale", 0.0)
        return super().generate(pipe, **kwargs)

    @classmethod
    def inference_defaults(cls, pipe):
        """(steps, guidance): dev 28 / 3.5, schnell 4 / 0 (its pipeline's recommended settings)."""
        return (28, 3.5) if pipe.transformer.config.guidance_embeds else (4, 0.0)

    def header_facts(self):
        """sd-scripts' Flux values: ss_base_model_version flux1, modelspec flux-1-dev / flux-1-schnell."""
        variant = "schnell" if self.schnell() else "dev"
        return {"ss_base_model_version": "flux1", "ss_v2": "False", "ss_v_parameterization": "False",
                "ss_clip_skip": "None", "modelspec.architecture": f"flux-1-{variant}",
                "modelspec.implementation": "https://github.com/black-forest-labs/flux",
                "modelspec.prediction_type": "flow"}

    def license(self):
        return "apache-2.0" if self.schnell() else "other"  # dev: the FLUX.1 [dev] non-commercial licence

    @classmethod
    def made_lora(cls, keys):
        """Flux's single-stream blocks are in no other family."""
        return any("single_transformer_blocks" in k or k.startswith("lora_unet_single_blocks") for k in keys)
