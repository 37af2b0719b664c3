"""SDXL: two CLIP text encoders (their penultimate hidden states side by side), the second's pooled projection,
and "time ids" (each image's original size, crop corner and target size) as the UNet's added conditioning."""
from .unet import UNetFamily


class StableDiffusionXL(UNetFamily):
    name = "SDXL"
    pipeline_class_name = "StableDiffusionXLPipeline"
    pipeline_class_names = ("StableDiffusionXLPipeline",)
    default_resolution = 1024
    text_encoder_names = ("text_encoder", "text_encoder_2")
    text_encoder_classes = ("CLIPTextModel", "CLIPTextModelWithProjection")
    embedding_file_keys = ("clip_l", "clip_g")  # <name>_emb.safetensors keys, as A1111/ComfyUI read them
    tokenizer_names = ("tokenizer", "tokenizer_2")
    kohya_text_prefixes = ("lora_te1_", "lora_te2_")
    empty_prompt_is_zeros = True  # force_zeros_for_empty_prompt: its pipeline guides from all-zero embeddings
    pipeline_extras = {"add_watermarker": False}  # the watermark needs an extra package and alters images
    sampling_embedding_names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                                "negative_pooled_prompt_embeds")
    unused_text_encoder_layers = True  # text encoder 1's last layer: only its penultimate output is read
    card_tags = ("stable-diffusion-xl", "stable-diffusion-xl-diffusers")
    ui_base = "an SDXL"
    flags = UNetFamily.flags + ("crops_coords_top_left_h", "crops_coords_top_left_w")
    fixed_crop_top_left = None  # --crops_coords_top_left_h/_w: one corner for every image instead of its own

    def encode(self, tokens, use_attention_mask=False):
        """As StableDiffusionXLPipeline.encode_prompt: each encoder's penultimate hidden state, concatenated on the
        feature axis, and the second encoder's projected pooled output ("text_embeds")."""
        import torch
        hidden, pooled = [], None
        for t, encoder in zip(tokens, self.text_encoders):
            mask = t["attention_mask"].to(encoder.device) if use_attention_mask else None
            out = encoder(t["input_ids"].to(encoder.device), attention_mask=mask, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", pooled)
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def conditioning(self, encoded, batch):
        """time ids: original (h, w), crop corner (top, left), target (h, w) of each image, as the pipeline's
        _get_add_time_ids builds them for sampling."""
        import torch
        hidden = encoded["encoder_hidden_states"]
        corners = batch["crop_top_lefts"]
        if self.fixed_crop_top_left is not None:
            corners = torch.tensor([self.fixed_crop_top_left] * len(corners), dtype=corners.dtype,
                                   device=corners.device)
        time_ids = torch.cat([batch["original_sizes"], corners, batch["target_sizes"]], dim=1)
        return {"encoder_hidden_states": hidden,
                "added_cond_kwargs": {"text_embeds": encoded["text_embeds"].to(hidden.dtype),
                                      "time_ids": time_ids.to(hidden.device, hidden.dtype)}}

    def kohya_unet_module(self, path):
        """sd-scripts write SDXL UNet LoRA under the original module names (input_blocks.4.1...), and A1111 cannot
        map some diffusers names of SDXL (add_embedding, the first up block's upsampler)."""
        from .ldm_names import unet_module_to_ldm
        config = self.unet.config
        return unet_module_to_ldm(path, config.layers_per_block, config.up_block_types)

    def configure(self, crops_coords_top_left_h=None, crops_coords_top_left_w=None, **options):
        """--crops_coords_top_left_h/_w: one crop corner for every image's time ids (diffusers' flags)."""
        if crops_coords_top_left_h is not None or crops_coords_top_left_w is not None:
            self.fixed_crop_top_left = (crops_coords_top_left_h or 0, crops_coords_top_left_w or 0)
        return super().configure(**options)

    def header_facts(self):
        """SDXL reads text encoder 1's penultimate layer by design, for which sd-scripts writes clip skip None
        (A1111's setting does not apply); its UNet modules are named as in Stability's generative-models."""
        v_pred = self.prediction_type() == "v_prediction"
        return {"ss_base_model_version": "sdxl_base_v1-0", "ss_v2": "False", "ss_v_parameterization": str(v_pred),
                "ss_clip_skip": "None", "modelspec.architecture": "stable-diffusion-xl-v1-base",
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
                "modelspec.prediction_type": "v" if v_pred else "epsilon"}

    def license(self):
        return "openrail++"
