"""The flow-matching transformer generation (SD 3, Flux): a transformer denoiser, FlowMatchEulerDiscreteScheduler,
rectified-flow training (objectives.FlowMatchingObjective) with diffusers' SD3/Flux scripts' flags, sampling with
the model's own flow-matching Euler scheduler, and LoRA files whose transformer keys keep diffusers' module paths
(`transformer.<module>`), which ComfyUI maps onto its own fused weights."""
from ..errors import UsageError
from ..objectives import WEIGHTING_SCHEMES
from .base import ModelFamily

# The flags diffusers' train_dreambooth_lora_sd3.py / _flux.py add to the SD ones, with their help; each family
# says which it takes (refused with one line on the others) and its defaults (flag_defaults).
FLOW_FLAG_SPECS = {
    "weighting_scheme": dict(choices=WEIGHTING_SCHEMES, help="Flow matching: how training timesteps are drawn and "
                             "weighted (diffusers' flag; default logit_normal for SD 3, none for Flux, as their "
                             "scripts)."),
    "logit_mean": dict(type=float, help="--weighting_scheme logit_normal: mean of the logit-normal (default 0.0)."),
    "logit_std": dict(type=float, help="--weighting_scheme logit_normal: std of the logit-normal (default 1.0)."),
    "mode_scale": dict(type=float, help="--weighting_scheme mode: its scale (default 1.29)."),
    "max_sequence_length": dict(type=int, help="T5 tokens per prompt (default 77 for SD 3, 512 for Flux.1-dev, 256 "
                                "for schnell, as diffusers' scripts); at most what the T5 encoder can take."),
    "lora_layers": dict(help="SD 3 / Flux: comma-separated transformer module names that get LoRA (diffusers' name "
                        "for --lora_target_modules)."),
    "upcast_before_saving": dict(action="store_true", help="SD 3 / Flux (diffusers' flag): save the LoRA in fp32. "
                                 "Always the case here (LoRA weights train and are saved in fp32); accepted so "
                                 "diffusers' commands run unchanged."),
}


class FlowFamily(ModelFamily):
    denoiser_name = "transformer"
    scheduler_class = "FlowMatchEulerDiscreteScheduler"
    a1111 = False
    own_sampler_only = True
    flags = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale", "max_sequence_length", "lora_layers",
             "upcast_before_saving")
    flag_specs = FLOW_FLAG_SPECS
    flag_defaults = {"weighting_scheme": "logit_normal", "logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29,
                     "max_sequence_length": 77}
    t5_name = None                 # the T5 encoder's pipeline attribute (its positions bound --max_sequence_length)
    max_sequence_length_limit = 512  # what the pipeline's encode_prompt accepts

    @classmethod
    def check_flags(cls, args, t5_positions=None):
        """Family-specific checks once the family is known and its defaults filled in, before any weights load.
        t5_positions: the T5 tokenizer's model_max_length (from the model folder), None when unknown or no T5."""
        n = args.max_sequence_length
        if n < 1:
            raise UsageError(f"--max_sequence_length must be >= 1 (got {n})")
        limit = cls.max_sequence_length_limit
        if n > limit:
            raise UsageError(f"--max_sequence_length {n} is above {limit}, the most {cls.name}'s pipeline takes; "
                             f"use {limit} or less")
        if t5_positions and n > t5_positions:
            raise UsageError(f"--max_sequence_length {n} is beyond the T5 encoder's {t5_positions} positions "
                             f"(its tokenizer's model_max_length); use {t5_positions} or less")

    def objective(self, noise_offset=None, snr_gamma=None):
        from ..objectives import FlowMatchingObjective
        o = self.options
        return FlowMatchingObjective(self.noise_scheduler, o.get("weighting_scheme", "none"), o.get("logit_mean", 0.0),
                                     o.get("logit_std", 1.0), o.get("mode_scale", 1.29),
                                     bool(o.get("precondition_outputs", 0)))

    @classmethod
    def sampling_scheduler(cls, config):
        """The model's own flow-matching Euler scheduler (a fresh one: sampling sets its timesteps)."""
        from diffusers import FlowMatchEulerDiscreteScheduler
        return FlowMatchEulerDiscreteScheduler.from_config(config)

    def ui_denoiser_key(self, module):
        """diffusers' own layout, `transformer.<module path>`: ComfyUI maps it onto its fused qkv weights for SD 3
        and Flux (and diffusers reads it back), so one name serves both."""
        return f"transformer.{module}"

    @classmethod
    def diffusers_state_from_ui(cls, state):
        """Our UI file (transformer.<module>.lora_down/lora_up/alpha, lora_te<N>_text_model_... for the CLIPs) as
        the diffusers layout the family's pipeline loads: alpha/rank folded into lora_B (ComfyUI reads the alpha
        keys; diffusers' SD 3 / Flux loaders refuse keys without "lora" in them)."""
        import re
        out = {}
        prefixes = dict(zip(cls.kohya_text_prefixes, cls.text_encoder_names))
        clip = re.compile(r"^(lora_te\d_)text_model_encoder_layers_(\d+)_(self_attn_(?:[qkv]|out)_proj|mlp_fc[12])$")
        for key, value in state.items():
            if not key.endswith(".lora_down.weight"):
                continue
            name = key[:-len(".lora_down.weight")]
            up = state[f"{name}.lora_up.weight"]
            alpha = state.get(f"{name}.alpha")
            scale = float(alpha) / value.shape[0] if alpha is not None else 1.0
            match = clip.match(name)
            if match:
                part, layer, module = match.groups()
                module = module.replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
                name = f"{prefixes[part]}.text_model.encoder.layers.{layer}.{module}"
            out[f"{name}.lora_A.weight"] = value
            out[f"{name}.lora_B.weight"] = up * scale
        return out

    def generate(self, pipe, **kwargs):
        """As the base's, with the run's T5 length (the pipelines' own default differs: 256 / 512)."""
        kwargs.setdefault("max_sequence_length", self.t5_max_length())
        return super().generate(pipe, **kwargs)

    def t5_max_length(self):
        return self.options.get("max_sequence_length") or self.flag_defaults["max_sequence_length"]

    def max_lengths(self, max_length=None):
        """CLIP: --tokenizer_max_length or its own 77; T5: --max_sequence_length."""
        lengths = super().max_lengths(max_length)
        if self.t5_name in self.text_encoder_names:
            lengths[self.text_encoder_names.index(self.t5_name)] = self.t5_max_length()
        return lengths

