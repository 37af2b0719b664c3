"""The UNet / DDPM generation (SD 1.x/2.x, SDXL): a UNet2DConditionModel denoiser, a DDPM noise scheduler whose
add_noise training uses (epsilon or v-prediction, min-SNR, noise offset), DPM-Solver++ for sampling, and kohya
files named after the UNet's modules."""
from .base import ModelFamily


class UNetFamily(ModelFamily):
    denoiser_name = "unet"
    denoiser_class = "UNet2DConditionModel"
    scheduler_class = "DDPMScheduler"
    default_lora_targets = "to_q,to_k,to_v,to_out.0"
    text_encoder_lora_targets = (("q_proj", "k_proj", "v_proj", "out_proj"),) * 2  # CLIP's attention, each encoder
    inference_steps, guidance_scale = 30, 7.5  # infer.py's and evaluate.py's defaults (DPM-Solver++)
    # DDPM's (refused on flow-matching models), and the CLIP padding mask only SD/SDXL's encode reads
    flags = ("prediction_type", "snr_gamma", "noise_offset", "text_encoder_use_attention_mask")
    flag_defaults = {"noise_offset": 0.0}
    common_defaults = {"learning_rate": 5e-4, "adam_weight_decay": 1e-2}  # diffusers' SD / SDXL scripts

    @property
    def unet(self):
        return self.denoiser

    @classmethod
    def training_scheduler(cls, config, source=None):
        """DDPM from the model's own scheduler config (whatever it samples with), --prediction_type applied."""
        from diffusers import DDPMScheduler
        overrides = {"prediction_type": source.prediction_type} if source and source.prediction_type else {}
        return DDPMScheduler.from_config(config, **overrides)

    def objective(self, noise_offset=0.0, snr_gamma=None):
        from ..objectives import DDPMObjective
        return DDPMObjective(self.noise_scheduler, noise_offset, snr_gamma)

    def denoise(self, denoiser, noisy, timesteps, conditioning, batch):
        return denoiser(noisy, timesteps, return_dict=False, **conditioning)[0]

    def size_multiple(self):
        """The VAE's downsampling times the UNet's."""
        return self.vae_scale() * 2 ** (len(self.denoiser.config.down_block_types) - 1)

    @classmethod
    def sampling_scheduler(cls, config):
        """DPM-Solver++, so 25 steps look like DDPM's 1000."""
        from diffusers import DPMSolverMultistepScheduler
        return DPMSolverMultistepScheduler.from_config(config)

    def ui_denoiser_key(self, module):
        """kohya's lora_unet_<module path with _> (SD 1.x/2.x: diffusers paths; SDXL overrides kohya_unet_module)."""
        return "lora_unet_" + self.kohya_unet_module(module).replace(".", "_")

    def kohya_unet_module(self, path):
        """The kohya/A1111 name of a UNet module path (before the `lora_unet_` prefix and `_` joining)."""
        return path

    def prediction_type(self):
        return self.noise_scheduler.config.prediction_type

    @classmethod
    def made_lora(cls, keys):
        return any(k.startswith(("unet.", "lora_unet_")) for k in keys)
