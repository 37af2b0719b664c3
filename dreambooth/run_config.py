"""The run's settings, typed: one frozen dataclass per flag group, built once from the checked flags.

`config.validate(args)` checks the parsed flags and returns a `RunConfig`: every group resolved (the family's
defaults filled in, the resume path found, fp16 on a CPU turned to fp32) without touching the parsed namespace.
From there on nothing reads flags: each setup step of the recipe receives the group(s) it needs, and what the run
itself decides while setting up (the precision accelerate picked, whether text embeddings and latents were cached,
the Hub repo) goes into a `RunRecord`, from which config.yaml, the model card and the kohya header are written.

The groups are the parser's own (`config.build_parser`: one argument group per dataclass, the same names, in
the same order as --help and docs/flags.md list them); a test keeps the two in step. The flags some families add
(SD 3's, Flux's) are the family's group: `RunConfig.family_options`, only the flags its family takes.
"""
import dataclasses
import types
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional


@dataclass(frozen=True)
class ModelConfig:
    """Where the base model comes from (families.ModelSource reads these names)."""
    pretrained_model_name_or_path: str
    revision: Optional[str]
    variant: Optional[str]
    tokenizer_name: Optional[str]
    single_file_config: Optional[str]
    pretrained_vae_model_name_or_path: Optional[str]
    cache_dir: Optional[str]
    prediction_type: Optional[str]


@dataclass(frozen=True)
class DataConfig:
    """The photos, their captions and prompts, how they become batches, and what is computed once."""
    instance_data_dir: Optional[str]
    dataset_name: Optional[str]
    image_column: str
    dataset_config_name: Optional[str]
    caption_column: Optional[str]
    instance_prompt: str
    resolution: int
    crops_coords_top_left_h: Optional[int]
    crops_coords_top_left_w: Optional[int]
    center_crop: bool
    random_flip: bool
    repeats: int
    caption_dropout_rate: float
    image_interpolation_mode: str
    dataloader_num_workers: int
    enable_bucket: bool
    min_bucket_reso: int
    max_bucket_reso: int
    bucket_reso_steps: int
    cache_latents: Optional[bool]               # None: the run decides (RunRecord.cache_latents)
    pre_compute_text_embeddings: Optional[bool]  # None: the run decides (RunRecord.pre_compute_text_embeddings)
    tokenizer_max_length: Optional[int]
    text_encoder_use_attention_mask: bool

    @property
    def buckets(self):
        """(smallest side, largest side, step) with --enable_bucket, else None."""
        return (self.min_bucket_reso, self.max_bucket_reso, self.bucket_reso_steps) if self.enable_bucket else None


@dataclass(frozen=True)
class PriorConfig:
    """Prior preservation: the class prompt, and where its targets come from (class images or the base's output)."""
    with_prior_preservation: bool
    prior_loss_weight: float
    prior_preservation_mode: str
    class_prompt: Optional[str]
    class_data_dir: Optional[str]
    num_class_images: int
    sample_batch_size: int
    class_generation_steps: int
    prior_generation_precision: Optional[str]

    @property
    def class_images(self):
        """Class images are generated and trained on (today's DreamBooth prior)."""
        return self.with_prior_preservation and self.prior_preservation_mode == "images"

    @property
    def base_output(self):
        """The class targets are the base model's own output on its sampling paths (no class images)."""
        return self.with_prior_preservation and self.prior_preservation_mode == "base_output"


@dataclass(frozen=True)
class LoraConfig:
    """The LoRA's shape and what trains: adapters, new tokens (pivotal tuning) and each one's share of the run."""
    rank: int
    lora_alpha: Optional[float]
    lora_dropout: float
    use_dora: bool
    lora_target_modules: str                    # resolved: the family's default when not given
    train_text_encoder: bool
    train_text_encoder_ti: bool
    token_abstraction: str
    num_new_tokens_per_abstraction: int
    initializer_concept: Optional[str]
    train_text_encoder_ti_frac: float
    train_transformer_frac: float
    train_text_encoder_frac: float


@dataclass(frozen=True)
class MemoryConfig:
    """A quantized frozen base, and what leaves the device once its outputs are cached."""
    quantize_base: Optional[str]
    bnb_quantization_config_path: Optional[str]
    quantize_text_encoders: bool
    sample_with_full_base: bool
    keep_frozen_on_device: bool


@dataclass(frozen=True)
class TrainingConfig:
    """The loop: steps, batches, devices and precision, and the objective's DDPM options."""
    seed: Optional[int]
    train_batch_size: int
    num_train_epochs: int
    max_train_steps: Optional[int]
    gradient_accumulation_steps: int
    gradient_checkpointing: bool
    mixed_precision: Optional[str]               # as asked; what ran is RunRecord.mixed_precision
    allow_tf32: bool
    enable_xformers_memory_efficient_attention: bool
    torch_compile: bool
    dynamo_backend: str
    snr_gamma: Optional[float]
    noise_offset: Optional[float]
    local_rank: int
    ddp_timeout: int
    allow_nan_steps: int


@dataclass(frozen=True)
class OptimizerConfig:
    """The optimizer (AdamW, 8-bit AdamW, Prodigy), its learning rates and the schedule; the EMA of the weights."""
    learning_rate: float                         # resolved: the family's default when not given
    text_encoder_lr: Optional[float]
    scale_lr: bool
    lr_scheduler: str
    lr_warmup_steps: int
    lr_num_cycles: int
    lr_power: float
    optimizer: str                               # resolved: --use_8bit_adam reads as adamw8bit
    use_8bit_adam: bool
    adam_beta1: float
    adam_beta2: float
    adam_weight_decay: float
    adam_weight_decay_text_encoder: Optional[float]
    prodigy_beta3: Optional[float]
    prodigy_decouple: bool
    prodigy_use_bias_correction: bool
    prodigy_safeguard_warmup: bool
    adam_epsilon: float
    max_grad_norm: float
    use_ema: bool
    ema_decay: float

    @property
    def text_weight_decay(self):
        """The text encoders' and new tokens' weight decay: their own flag, else the denoiser's."""
        return self.adam_weight_decay if self.adam_weight_decay_text_encoder is None \
            else self.adam_weight_decay_text_encoder


@dataclass(frozen=True)
class OutputConfig:
    """Where the run writes, in which formats, and its checkpoints (resume_from_checkpoint: the resolved folder)."""
    output_dir: str
    overwrite_output_dir: bool
    checkpointing_steps: int
    output_kohya_format: bool
    output_format: str
    checkpoints_total_limit: Optional[int]
    resume_from_checkpoint: Optional[str]

    @property
    def kohya(self):
        return self.output_format in ("kohya", "both")


@dataclass(frozen=True)
class ValidationConfig:
    """Validation images and the trackers."""
    validation_prompt: Optional[str]
    num_validation_images: int
    skip_final_inference: bool
    validation_steps: Optional[int]
    validation_epochs: Optional[int]
    report_to: str
    logging_dir: str
    logging_steps: int


@dataclass(frozen=True)
class HubConfig:
    push_to_hub: bool
    hub_model_id: Optional[str]
    hub_token: Optional[str]


# parser group title (config.build_parser) -> its dataclass, in --help's order
GROUPS = {
    "base model": ("model", ModelConfig),
    "data (photos, captions, prompts, caching)": ("data", DataConfig),
    "prior preservation": ("prior", PriorConfig),
    "LoRA": ("lora", LoraConfig),
    "memory (quantized base, offloading)": ("memory", MemoryConfig),
    "training": ("training", TrainingConfig),
    "optimizer and schedule": ("optimizer", OptimizerConfig),
    "output and checkpoints": ("outputs", OutputConfig),
    "validation and logging": ("validation", ValidationConfig),
    "Hugging Face Hub": ("hub", HubConfig),
}
# flags that are not settings of the run: how the flags were given, and diffusers' flags refused by validate()
NOT_SETTINGS = ("help", "config", "debug", "validation_images", "class_labels_conditioning",
                "enable_npu_flash_attention", "do_edm_style_training")


def _frozen(value):
    return tuple(value) if isinstance(value, list) else value


@dataclass(frozen=True)
class RunConfig:
    """Everything a run is told, checked and resolved; built by config.validate(), never changed after."""
    model: ModelConfig
    data: DataConfig
    prior: PriorConfig
    lora: LoraConfig
    memory: MemoryConfig
    training: TrainingConfig
    optimizer: OptimizerConfig
    outputs: OutputConfig
    validation: ValidationConfig
    hub: HubConfig
    family: Any                                  # the family class (families/*.py), detected from the model
    family_options: Mapping[str, Any]            # the flags only this family takes (read-only)
    instance_images: tuple                       # the photos' paths, checked
    quantization: Optional[Mapping[str, Any]]   # BitsAndBytesConfig fields, or None
    checkpoint_settings: Mapping[str, Any]       # what a checkpoint must match to be resumed (checkpoints.py)
    lora_targets_flag: str = "--lora_target_modules"  # the flag the targets came from, for error lines
    requested: Mapping[str, Any] = field(default_factory=dict)  # the flags as asked (config.yaml: replayable)
    argv: Optional[tuple] = None                 # the command line as given (the card's Reproduce section)
    config_path: Optional[str] = None            # --config, if any

    @classmethod
    def build(cls, flags, family, instance_images, lora_targets_flag, quantization, checkpoint_settings):
        """From the checked, resolved flags (an argparse namespace of validate()'s own)."""
        values = vars(flags)
        groups = {name: klass(**{f.name: _frozen(values[f.name]) for f in fields(klass)})
                  for name, klass in GROUPS.values()}
        return cls(**groups, family=family,
                   family_options=types.MappingProxyType({f: values[f] for f in family.flags}),
                   instance_images=tuple(instance_images),
                   quantization=None if quantization is None else types.MappingProxyType(dict(quantization)),
                   checkpoint_settings=types.MappingProxyType(dict(checkpoint_settings)),
                   lora_targets_flag=lora_targets_flag,
                   requested=types.MappingProxyType(dict(values.get("_requested") or {})),
                   argv=None if values.get("_argv") is None else tuple(values["_argv"]),
                   config_path=values.get("config"))

    def settings(self):
        """Every setting as resolved, flag name -> value (the family's flags it does not take as None)."""
        out = {}
        for name, _ in GROUPS.values():
            out.update(dataclasses.asdict(getattr(self, name)))
        from .families import FAMILIES
        # the flags only some families declare (SD 3's, Flux's group): None where this family does not take them
        out.update({f: None for family in FAMILIES for f in family.flags if f not in out})
        out.update(self.family_options)
        return out

    def value(self, flag):
        """One setting as resolved, by its flag name (tests and messages)."""
        return self.settings()[flag]

    def as_flags(self):
        """The resolved settings as a namespace of flag names, a copy: for the checks written against the parsed
        flags (validate's), which a single-file model can only run once it has loaded. Nothing reads it back."""
        return types.SimpleNamespace(**self.settings(), _family=self.family,
                                     _lora_targets_flag=self.lora_targets_flag)


@dataclass
class RunRecord:
    """What the run decided as it set up, beside what it was told: config.yaml, the model card and the kohya header
    are written from RunConfig + this. Filled in by the recipe; None = not decided yet."""
    mixed_precision: Optional[str] = None            # what accelerate ran with: no, fp16, bf16
    pre_compute_text_embeddings: Optional[bool] = None
    cache_latents: Optional[bool] = None
    hub_repo_id: Optional[str] = None                # the repo --push_to_hub created or found

    def decided(self):
        """The record as flag values (those decided so far), over the resolved settings."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None and k != "hub_repo_id"}
