"""Stable Diffusion 3 / 3.5 (StableDiffusion3Pipeline): an MMDiT transformer (SD3Transformer2DModel) over 16-channel
latents (VAE with a shift factor), conditioned on CLIP-L and CLIP-G (penultimate hidden states side by side, zero-
padded to T5's width, then T5-XXL's tokens after them) and on both CLIPs' pooled projections; trained by flow
matching. A model folder without text_encoder_3 trains without T5 (zeros in its place), as the pipeline allows."""
from ..errors import UsageError
from .flow import FlowFamily


class StableDiffusion3(FlowFamily):
    name = "SD 3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    pipeline_class_names = ("StableDiffusion3Pipeline",)
    default_resolution = 512  # diffusers' SD3 script default (SD 3.5 itself is trained at 1024)
    denoiser_class = "SD3Transformer2DModel"
    # diffusers' SD3 script: every attention projection of the joint blocks, image and text stream
    default_lora_targets = ("attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,"
                            "attn.to_q,attn.to_v")
    text_encoder_names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    text_encoder_classes = ("CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel")
    optional_text_encoders = ("text_encoder_3",)
    tokenizer_names = ("tokenizer", "tokenizer_2", "tokenizer_3")
    t5_name = "text_encoder_3"
    # --train_text_encoder: LoRA on both CLIPs' attention; T5 stays frozen (diffusers' script)
    text_encoder_lora_targets = (("q_proj", "k_proj", "v_proj", "out_proj"),) * 2 + (None,)
    embedding_file_keys = ("clip_l", "clip_g", "t5")
    kohya_text_prefixes = ("lora_te1_", "lora_te2_", "lora_te3_")
    sampling_embedding_names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                "negative_pooled_prompt_embeds")
    unused_text_encoder_layers = False  # the pooled projection reads each CLIP's last layer
    inference_steps, guidance_scale = 28, 7.0
    flags = FlowFamily.flags + ("precondition_outputs", "lora_blocks")
    flag_specs = dict(FlowFamily.flag_specs,
                      precondition_outputs=dict(type=int, choices=(0, 1), help="SD 3: 1 scores the model's "
                                                "output as a clean-latent estimate, EDM-style, as diffusers' SD3 "
                                                "script does; 0 scores the velocity (default 1)."),
                      lora_blocks=dict(help="SD 3: comma-separated transformer block numbers whose modules get LoRA "
                                       "(diffusers' flag; default: every block)."))
    flag_defaults = dict(FlowFamily.flag_defaults, precondition_outputs=1)
    common_defaults = {"learning_rate": 1e-4, "text_encoder_lr": 5e-6, "adam_weight_decay": 1e-4,  # diffusers'
                       "adam_weight_decay_text_encoder": 1e-3}                                    # SD3 script
    card_tags = ("sd3", "sd3-diffusers")

    @classmethod
    def check_flags(cls, args, t5_positions=None):
        super().check_flags(args, t5_positions)
        if args.lora_blocks:  # as diffusers: the chosen blocks' modules only
            try:
                blocks = [int(b) for b in args.lora_blocks.split(",") if b.strip()]
            except ValueError:
                raise UsageError(f"--lora_blocks {args.lora_blocks}: give block numbers, e.g. --lora_blocks 0,1,12")
            args.lora_target_modules = ",".join(f"transformer_blocks.{b}.{m.strip()}" for b in blocks
                                                for m in args.lora_target_modules.split(",") if m.strip())
            args.lora_blocks, args._lora_targets_flag = None, "--lora_blocks"

    @classmethod
    def pivotal_text_encoders(cls, options):
        """Pivotal tuning on the CLIP encoders; T5 reads the new tokens' text as word pieces."""
        return [0, 1]

    def size_multiple(self):
        """The VAE's downsampling times the transformer's patch size (SD 3: 8 x 2 = 16)."""
        return self.vae_scale() * self.denoiser.config.patch_size

    @classmethod
    def sampling_size_multiple(cls, pipe):
        return pipe.vae_scale_factor * pipe.transformer.config.patch_size

    def encode(self, tokens, use_attention_mask=False):
        """As StableDiffusion3Pipeline.encode_prompt (clip_skip None): each CLIP's penultimate hidden state, side by
        side and zero-padded to T5's width, then T5's last hidden state after them on the token axis (zeros of
        --max_sequence_length tokens without T5); the pooled projections of both CLIPs side by side."""
        import torch
        import torch.nn.functional as F
        clip_hidden, pooled = [], []
        for t, encoder in zip(tokens[:2], self.text_encoders[:2]):
            out = encoder(t["input_ids"].to(encoder.device), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(clip_hidden, dim=-1)
        width = self.denoiser.config.joint_attention_dim
        if len(self.text_encoders) > 2:
            encoder = self.text_encoders[2]
            t5 = encoder(tokens[2]["input_ids"].to(encoder.device))[0].to(clip.dtype)
        else:
            t5 = torch.zeros(clip.shape[0], self.t5_max_length(), width, device=clip.device, dtype=clip.dtype)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def conditioning(self, encoded, batch):
        hidden = encoded["encoder_hidden_states"]
        return {"encoder_hidden_states": hidden, "pooled_projections": encoded["pooled_projections"].to(hidden.dtype)}

    def denoise(self, denoiser, noisy, timesteps, conditioning, batch):
        return denoiser(hidden_states=noisy, timestep=timesteps, return_dict=False, **conditioning)[0]

    def sampling_embeddings(self, pipe, prompt):
        encoded = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=pipe.device,
                                     num_images_per_prompt=1, do_classifier_free_guidance=True,
                                     max_sequence_length=self.t5_max_length())
        return dict(zip(self.sampling_embedding_names, encoded))

    def model_type(self):
        """sd-scripts' SD 3 model type: medium (SD 3), 5-large (qk-norm, no second attention), 5-medium (qk-norm and
        the dual attention layers of SD 3.5 Medium)."""
        config = self.denoiser.config
        if not config.get("qk_norm"):
            return "medium"
        return "5-medium" if tuple(config.get("dual_attention_layers") or ()) else "5-large"

    def header_facts(self):
        """As sd-scripts writes them for an SD 3 LoRA: ss_base_model_version is the model type, modelspec
        stable-diffusion-3-<type>, the diffusers module layout, and prediction type epsilon (what it writes)."""
        kind = self.model_type()
        return {"ss_base_model_version": kind, "ss_v2": "False", "ss_v_parameterization": "False",
                "ss_clip_skip": "None", "modelspec.architecture": f"stable-diffusion-3-{kind}",
                "modelspec.implementation": "diffusers", "modelspec.prediction_type": "epsilon"}

    def license(self):
        return "other"  # the Stability AI Community License: the base's own card says it

    @classmethod
    def made_lora(cls, keys):
        """Transformer keys without Flux's single-stream blocks (a Flux LoRA of double blocks only reads the
        same; diffusers then names the layers that do not fit)."""
        return any(k.startswith("transformer.transformer_blocks.") for k in keys) and \
            not any("single_transformer_blocks" in k for k in keys)
