"""Stable Diffusion 1.x / 2.x: one CLIP text encoder whose last hidden state is the UNet's cross-attention input."""
from accelerate.utils import extract_model_from_parallel

from .unet import UNetFamily


class StableDiffusion(UNetFamily):
    name = "SD 1.x/2.x"
    pipeline_class_name = "StableDiffusionPipeline"
    pipeline_class_names = ("StableDiffusionPipeline",)
    default_resolution = 512
    text_encoder_names = ("text_encoder",)
    text_encoder_classes = ("CLIPTextModel",)
    embedding_file_keys = ("emb_params",)  # <name>_emb.safetensors keys, as A1111/ComfyUI read them
    tokenizer_names = ("tokenizer",)
    kohya_text_prefixes = ("lora_te_",)
    pipeline_extras = {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    single_file_extras = {"safety_checker": None, "requires_safety_checker": False}
    sampling_embedding_names = ("prompt_embeds", "negative_prompt_embeds")
    card_tags = ("stable-diffusion", "stable-diffusion-diffusers")

    def encode(self, tokens, use_attention_mask=False):
        """The text encoder's last hidden state. SD's CLIP was trained without a padding mask, hence none unless
        --text_encoder_use_attention_mask (diffusers' flag, for other encoders)."""
        (t,), (encoder,) = tokens, self.text_encoders
        mask = t["attention_mask"].to(encoder.device) if use_attention_mask else None
        return {"encoder_hidden_states": encoder(t["input_ids"].to(encoder.device), attention_mask=mask,
                                                 return_dict=False)[0]}

    def conditioning(self, encoded, batch):
        return {"encoder_hidden_states": encoded["encoder_hidden_states"]}

    def is_v2(self):
        """SD 2.x: OpenCLIP ViT-H text encoder (1024 wide) feeding a UNet whose cross-attention reads 1024 features;
        SD 1.x has CLIP ViT-L (768). Either size says it (a text encoder swapped by --tokenizer_name keeps its width)."""
        # While the text encoder trains on several processes the family holds its DDP wrapper (its forward is
        # what syncs gradients), which has no .config: read the module inside.
        encoder = extract_model_from_parallel(self.text_encoders[0])
        return encoder.config.hidden_size == 1024 or self.unet.config.cross_attention_dim == 1024

    def base_model_version(self):
        """As kohya's sd-scripts name it: sd_v1 or sd_v2, with _v for v-prediction (SD 2.x 768)."""
        return ("sd_v2" if self.is_v2() else "sd_v1") + ("_v" if self.prediction_type() == "v_prediction" else "")

    def architecture(self):
        """Stability's modelspec architecture id of the base."""
        if not self.is_v2():
            return "stable-diffusion-v1"
        return "stable-diffusion-v2-768-v" if self.prediction_type() == "v_prediction" else "stable-diffusion-v2-512"

    def header_facts(self):
        """A1111 files the LoRA under SD 1 / SD 2 by ss_base_model_version and ss_v2; SD reads the text encoder's
        last layer (A1111's clip skip 1); the module names are diffusers' (modelspec implementation)."""
        v_pred = self.prediction_type() == "v_prediction"
        return {"ss_base_model_version": self.base_model_version(), "ss_v2": str(self.is_v2()),
                "ss_v_parameterization": str(v_pred), "ss_clip_skip": "1",
                "modelspec.architecture": self.architecture(), "modelspec.implementation": "diffusers",
                "modelspec.prediction_type": "v" if v_pred else "epsilon"}

    def license(self):
        """The licence the family's released weights carry, for bases whose own card does not say."""
        return "openrail++" if self.is_v2() else "creativeml-openrail-m"
