"""Flags, --config files and fail-fast validation.

Everything here runs before any model is loaded: a bad flag must cost the user a second,
not a 30-minute class-image generation. Flag names and meanings follow diffusers'
examples/dreambooth/train_dreambooth_lora.py so existing commands run unchanged.
"""
import argparse
import importlib.util
import json
import os
import re
import shutil
import sys

from .errors import UsageError, first_line  # noqa: F401  (UsageError re-exported: callers import it from here too)
from .images import IMAGE_EXTENSIONS, check_captions, check_images, list_images, list_instance_images
from .files import sniff_weights_file, writable_folder_problem
from .lora_io import LORA_WEIGHT_NAME
from .optimizers import OPTIMIZERS, check_optimizer_flags
from . import outputs, pivotal, redaction

LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
INTERPOLATION_MODES = ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
TRACKERS = ("tensorboard", "wandb", "comet_ml")
DYNAMO_BACKENDS = ("inductor", "cudagraphs", "aot_eager", "eager")  # torch's own; others need extra packages
IF_ONLY_FLAGS = ("validation_images", "class_labels_conditioning")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def finite_float(text):
    """argparse type: a float that is a number. float('nan') and float('inf') parse, and a NaN learning rate
    or guidance scale trains or samples garbage without a word."""
    value = float(text)
    if value != value or value in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def seed_int(text):
    """argparse type: a seed every RNG accepts. accelerate's set_seed also seeds numpy, whose range is
    0 .. 2**32-1 (torch alone would take 64 bits), so a larger seed would fail after the model loads."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"{text} is outside 0..4294967295 (the range numpy and torch both accept)")
    return value


def path_arg(text):
    """argparse type for paths: `~` and `$VARS` expanded, on the command line (where a quoted or `--flag=~/x`
    path reaches us unexpanded) and in --config files alike. Hub ids pass through unchanged."""
    return os.path.expanduser(os.path.expandvars(text))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's layout (the example command) and shows each default once: not for flags
    that are off or unset, nor where the help text already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text.lower():
            return text
        return f"{text} (default: {action.default})"


DESCRIPTION = """\
Teach a Stable Diffusion model one subject from 3-20 photos and save a LoRA that diffusers
(pipe.load_lora_weights), ComfyUI and AUTOMATIC1111 load. Flags follow diffusers'
examples/dreambooth/train_dreambooth_lora.py, with the same meanings and defaults.

required: --pretrained_model_name_or_path, --instance_data_dir (or --dataset_name), --instance_prompt

example:
  accelerate launch train_dreambooth_lora.py \\
    --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
    --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \\
    --with_prior_preservation --class_prompt "a photo of dog" --output_dir work_dirs/sd15_dog

Every on/off flag has a --no-... form (to turn off what a --config file turned on).
"""


class OptionalBool(argparse.BooleanOptionalAction):
    """An on/off flag that also takes a value: `--flag`, `--no-flag`, `--flag false`, `--flag=True`. diffusers'
    advanced scripts declare the Prodigy switches with type=bool and are called with a value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.nargs = "?"

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-") or values is None:
            return super().__call__(parser, namespace, None, option_string)
        word = str(values).strip().lower()
        if word not in TRUE_WORDS + FALSE_WORDS:
            raise argparse.ArgumentError(self, f"expected true or false, got {values!r}")
        setattr(namespace, self.dest, word in TRUE_WORDS)


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on error; we print one line that names the flag."""

    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = OneLineParser(prog="train_dreambooth_lora.py", description=DESCRIPTION, formatter_class=HelpFormatter,
                      usage="%(prog)s --pretrained_model_name_or_path MODEL --instance_data_dir DIR "
                            "--instance_prompt PROMPT [options]")

    g = p.add_argument_group("config file")
    g.add_argument("--config", type=path_arg, default=None,
                   help="YAML or TOML file whose keys are flag names (without --). Command-line flags win. "
                        "The flags as asked are saved as output_dir/config.yaml (what the run decided itself as "
                        "comments): replay it with --config and a new --output_dir.")

    g.add_argument("--debug", action="store_true",
                   help="Show the full Python traceback on errors (for bug reports); same as DREAMBOOTH_DEBUG=1.")

    g = p.add_argument_group("base model")
    g.add_argument("--pretrained_model_name_or_path", type=path_arg, default=None,
                   help="Hub id, local diffusers folder, or a single .safetensors/.ckpt checkpoint file.")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the base model.")
    g.add_argument("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    g.add_argument("--tokenizer_name", type=path_arg, default=None, help="Tokenizer to use instead of the base model's own.")
    g.add_argument("--single_file_config", type=path_arg, default=None,
                   help="For a single-file base model: hub id or diffusers folder whose configs describe its "
                        "architecture (default: let diffusers infer it, which needs the hub).")
    g.add_argument("--pretrained_vae_model_name_or_path", type=path_arg, default=None,
                   help="A VAE to use instead of the model's own: a hub id or folder (e.g. madebyollin/sdxl-vae-fp16-fix "
                        "for SDXL in fp16, stabilityai/sd-vae-ft-mse for SD 1.5).")
    g.add_argument("--cache_dir", type=path_arg, default=None,
                   help="Where downloaded models and datasets are cached (default: the Hugging Face cache).")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="SD 1.x/2.x, SDXL: override the scheduler's prediction type (default: the base model's own).")

    g = p.add_argument_group("data (photos, captions, prompts, caching)")
    g.add_argument("--instance_data_dir", type=path_arg, default=None,
                   help="Folder of subject photos (jpg/png/webp/bmp). 'photo.txt' beside 'photo.jpg' is its caption.")
    g.add_argument("--dataset_name", type=path_arg, default=None,
                   help="Instead of --instance_data_dir: a Hugging Face dataset id or local dataset path "
                        "(needs the optional `datasets` package).")
    g.add_argument("--image_column", default="image", help="Dataset column holding the images.")
    g.add_argument("--dataset_config_name", default=None,
                   help="The dataset's configuration name, for datasets that have several.")
    g.add_argument("--caption_column", default=None,
                   help="Dataset column holding per-image captions (default: --instance_prompt for all).")
    g.add_argument("--instance_prompt", default=None, help="Prompt naming the subject, e.g. 'a photo of sks dog'.")
    g.add_argument("--resolution", type=int, default=None,
                   help="Training resolution in pixels (default: 512 for SD 1.x/2.x, 1024 for SDXL, as diffusers' "
                        "scripts): a multiple of what the model can take (checked once it loads: the VAE's scale "
                        "factor times the UNet's downsampling, 64 for SD and SDXL).")
    g.add_argument("--crops_coords_top_left_h", type=int, default=None,
                   help="SDXL: one crop corner (top) for every image's time ids, as diffusers' flag (default: each "
                        "image's real crop corner, carried through crops, buckets and the latent cache).")
    g.add_argument("--crops_coords_top_left_w", type=int, default=None,
                   help="SDXL: one crop corner (left) for every image's time ids (default: each image's real one).")
    g.add_argument("--center_crop", action=argparse.BooleanOptionalAction, default=False, help="Center-crop instead of random-crop to the resolution.")
    g.add_argument("--random_flip", action=argparse.BooleanOptionalAction, default=False, help="Randomly flip training images horizontally.")
    g.add_argument("--repeats", type=int, default=1, help="How many times each instance image is seen per epoch.")
    g.add_argument("--caption_dropout_rate", type=finite_float, default=0.0,
                   help="Share of instance examples trained with an empty prompt instead of their caption (diffusers' "
                        "newer scripts, kohya); drawn per example from the seed, so resumes replay it.")
    g.add_argument("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES,
                   help="Resampling filter used when resizing images.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader worker processes (0 = load in the main process).")
    g.add_argument("--enable_bucket", action=argparse.BooleanOptionalAction, default=False,
                   help="Aspect-ratio bucketing: non-square photos keep their shape instead of being cropped square.")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side in pixels.")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side in pixels.")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this.")
    g.add_argument("--cache_latents", action=argparse.BooleanOptionalAction, default=None,
                   help="Encode every image (and its mirror) with the VAE once and free the VAE during training; "
                        "the posterior's mean and std are kept, so each step still draws a fresh sample. Default: "
                        "on whenever the crops are fixed (--center_crop, --enable_bucket, or every image already "
                        "has the training shape); --no-cache_latents turns it off.")
    g.add_argument("--pre_compute_text_embeddings", action=argparse.BooleanOptionalAction, default=None,
                   help="Encode the fixed prompts once and free the text encoders during training. Default: on "
                        "whenever that is exact (the text encoders do not train); --no-pre_compute_text_embeddings "
                        "turns it off.")
    g.add_argument("--tokenizer_max_length", type=int, default=None,
                   help="Tokens per prompt (default: the tokenizer's own, 77 for CLIP); longer prompts are cut.")
    g.add_argument("--text_encoder_use_attention_mask", action=argparse.BooleanOptionalAction, default=False,
                   help="Pass the padding mask to the text encoder (SD's CLIP was trained without one).")

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=False,
                   help="Train on class images too, so the model keeps its idea of the class.")
    g.add_argument("--prior_loss_weight", type=finite_float, default=1.0, help="Weight of the class (prior) loss.")
    g.add_argument("--prior_preservation_mode", default="images", choices=["images", "base_output"],
                   help="images: class images generated by the base (DreamBooth's own). base_output: no class images; "
                        "the base (LoRA off) samples --num_class_images paths of the class prompt (and of each caption "
                        "with the trigger word taken out) as it would draw class images, and the prior rows are the "
                        "states on those paths, scored against the base's own output there, the empty prompt's "
                        "(classifier-free guidance's branch) included: nothing decoded or written, no extra forward "
                        "per step (docs/training.md).")
    g.add_argument("--class_prompt", default=None, help="Prompt for the class, e.g. 'a photo of dog'.")
    g.add_argument("--class_data_dir", type=path_arg, default=None,
                   help="Folder of class-prior images; missing ones are generated (default: output_dir/class_images).")
    g.add_argument("--num_class_images", type=int, default=None,
                   help="How many class images to use (default 100; missing ones are generated with the base model), "
                        "or with base_output how many of the base's sampling paths give prior rows (16 then).")
    g.add_argument("--sample_batch_size", type=int, default=4,
                   help="Batch size when generating class images (base_output: sampling paths).")
    g.add_argument("--class_generation_steps", type=int, default=25,
                   help="Sampler steps per generated class image (base_output: per sampling path).")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="Precision for class-image generation (default: fp16 on CUDA, fp32 elsewhere).")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (dimension of the update matrices).")
    g.add_argument("--lora_alpha", type=finite_float, default=None, help="LoRA alpha; the update is scaled by alpha/rank "
                   "(default: equal to rank, scale 1).")
    g.add_argument("--lora_dropout", type=finite_float, default=0.0, help="Dropout on the LoRA branch.")
    g.add_argument("--use_dora", action=argparse.BooleanOptionalAction, default=False, help="Weight-decomposed LoRA (DoRA).")
    g.add_argument("--lora_target_modules", default=None,
                   help="Comma-separated denoiser module names that get LoRA (default: the family's, as diffusers' "
                        "scripts: to_q,to_k,to_v,to_out.0 for SD 1.x/2.x and SDXL; the joint attention's projections "
                        "for SD 3 and Flux; see docs). --lora_layers is the same flag under the SD 3 / Flux scripts' "
                        "name.")
    g.add_argument("--train_text_encoder", action=argparse.BooleanOptionalAction, default=False,
                   help="Also train LoRA on the text encoder's attention (q,k,v,out projections).")
    g.add_argument("--train_text_encoder_ti", action=argparse.BooleanOptionalAction, default=False,
                   help="Pivotal tuning: new tokens stand for --token_abstraction in prompts and captions, and their "
                        "embeddings train with the LoRA (written to <output_dir name>_emb.safetensors).")
    g.add_argument("--token_abstraction", default="TOK",
                   help="The word in --instance_prompt, captions and --validation_prompt that the new tokens replace; "
                        "comma-separated for several subjects.")
    g.add_argument("--num_new_tokens_per_abstraction", type=int, default=2,
                   help="New tokens (embedding vectors) per --token_abstraction word.")
    g.add_argument("--initializer_concept", default=None,
                   help="Words whose token embeddings start the new ones, e.g. 'dog' (default: random, at the "
                        "embedding table's own scale).")
    g.add_argument("--train_text_encoder_ti_frac", type=finite_float, default=0.5,
                   help="Share of the steps in which the new token embeddings train; frozen after it (the 'pivot').")
    g.add_argument("--train_transformer_frac", type=finite_float, default=1.0,
                   help="Share of the steps in which the denoiser's LoRA trains (diffusers' advanced Flux flag; with "
                        "pivotal tuning the new tokens can go on alone after it).")
    g.add_argument("--train_text_encoder_frac", type=finite_float, default=1.0,
                   help="Share of the steps in which the text encoder's LoRA (--train_text_encoder) trains.")

    g = p.add_argument_group("memory (quantized base, offloading)")
    g.add_argument("--quantize_base", default=None, choices=["nf4", "int8"],
                   help="Store the frozen denoiser's linear layers in 4-bit NF4 (QLoRA; double quantization) or 8-bit "
                        "with bitsandbytes as they load; the LoRA trains on top in full precision and its files are "
                        "the same as from the full base. Class images and validation then sample from the quantized "
                        "base.")
    g.add_argument("--bnb_quantization_config_path", type=path_arg, default=None,
                   help="Instead of --quantize_base: a JSON file of BitsAndBytesConfig fields (diffusers' flag), "
                        "e.g. {\"load_in_4bit\": true, \"bnb_4bit_quant_type\": \"nf4\"}.")
    g.add_argument("--quantize_text_encoders", action=argparse.BooleanOptionalAction, default=False,
                   help="With a quantized base: quantize the text encoders too, except those --train_text_encoder "
                        "trains (T5, which never trains, is the big one: 4.7B parameters in SD 3.5 and Flux).")
    g.add_argument("--sample_with_full_base", action=argparse.BooleanOptionalAction, default=False,
                   help="With a quantized base: generate the class images with the unquantized base, loaded for that "
                        "alone and freed before training (more memory then, exact class images).")
    g.add_argument("--keep_frozen_on_device", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep the text encoders and the VAE on the GPU after their outputs are cached (by default "
                        "they leave it: validation brings back only what it needs).")

    g = p.add_argument_group("training")
    g.add_argument("--seed", type=seed_int, default=None, help="Seed for reproducible training and class images.")
    g.add_argument("--train_batch_size", type=int, default=4, help="Instance images per device per step.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (ignored when max_train_steps is set).")
    g.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="Recompute activations in backward to save memory (slower).")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Mixed precision (default: from `accelerate config`). Frozen weights use this dtype, "
                        "LoRA weights stay fp32.")
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=False, help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action=argparse.BooleanOptionalAction, default=False,
                   help="Use xformers attention (default is PyTorch SDPA).")
    g.add_argument("--torch_compile", action=argparse.BooleanOptionalAction, default=False,
                   help="Compile the UNet with torch.compile (kohya's flag). The first step pays the compilation "
                        "(minutes on CPU, where it gains nothing: measured in bench/); off by default.")
    g.add_argument("--dynamo_backend", default="inductor", choices=DYNAMO_BACKENDS,
                   help="torch.compile backend for --torch_compile (kohya's flag); eager/aot_eager only check that "
                        "a model compiles.")
    g.add_argument("--snr_gamma", type=finite_float, default=None,
                   help="SD 1.x/2.x, SDXL: min-SNR loss weighting gamma (5.0 is common).")
    g.add_argument("--noise_offset", type=finite_float, default=None,
                   help="SD 1.x/2.x, SDXL: noise offset (0.1 is common; default 0).")
    g.add_argument("--local_rank", type=int, default=-1,
                   help="Set by older distributed launchers; the process rank comes from the environment (accelerate).")
    g.add_argument("--ddp_timeout", type=int, default=1800,
                   help="Seconds a process waits for the others before giving up (multi-GPU), so a dead rank "
                        "ends the run instead of hanging it.")
    g.add_argument("--allow_nan_steps", type=int, default=0,
                   help="How many non-finite-loss steps to skip before stopping. Above 0 the loss is read back "
                        "before every update (a host sync per step); with accumulation, the bad micro-batch is "
                        "dropped and the window goes on.")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--learning_rate", type=finite_float, default=None,
                   help="Learning rate of the denoiser's LoRA (default: the family's, as diffusers' scripts: 5e-4 for "
                        "SD 1.x/2.x and SDXL, 1e-4 for SD 3).")
    g.add_argument("--text_encoder_lr", type=finite_float, default=None,
                   help="Learning rate of the text-encoder LoRA and of pivotal tuning's new token rows "
                        "(default: learning_rate; 5e-6 for SD 3, as its diffusers script).")
    g.add_argument("--scale_lr", action=argparse.BooleanOptionalAction, default=False,
                   help="Multiply learning rates by batch size x accumulation x processes.")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=500,
                   help="Warm-up steps of the schedule (the constant schedule has none; use constant_with_warmup).")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts for cosine_with_restarts.")
    g.add_argument("--lr_power", type=finite_float, default=1.0, help="Power of the polynomial schedule.")
    g.add_argument("--optimizer", type=str.lower, default="adamw", choices=OPTIMIZERS,
                   help="adamw (torch, fused), adamw8bit (bitsandbytes: less optimizer memory) or prodigy (sets its "
                        "own step size: use --learning_rate 1.0; needs `pip install prodigyopt`); case-insensitive, "
                        "as diffusers' advanced scripts.")
    g.add_argument("--use_8bit_adam", action=argparse.BooleanOptionalAction, default=False,
                   help="bitsandbytes 8-bit AdamW (less optimizer memory); the same as --optimizer adamw8bit.")
    g.add_argument("--adam_beta1", type=finite_float, default=0.9, help="AdamW (and Prodigy) beta1.")
    g.add_argument("--adam_beta2", type=finite_float, default=0.999, help="AdamW (and Prodigy) beta2.")
    g.add_argument("--adam_weight_decay", type=finite_float, default=None,
                   help="AdamW (and Prodigy) weight decay (default: 1e-2 for SD 1.x/2.x and SDXL, 1e-4 for SD 3, as "
                        "diffusers' scripts).")
    g.add_argument("--adam_weight_decay_text_encoder", type=finite_float, default=None,
                   help="Weight decay of the text encoder's LoRA and the new token embeddings (default: "
                        "--adam_weight_decay, as the base script; 1e-3 for SD 3, as its script and diffusers' advanced "
                        "scripts).")
    g.add_argument("--prodigy_beta3", type=finite_float, default=None,
                   help="Prodigy: coefficient of the running averages its step size is estimated from (default: the "
                        "square root of --adam_beta2).")
    g.add_argument("--prodigy_decouple", action=OptionalBool, default=True,
                   help="Prodigy: AdamW-style decoupled weight decay (default: on). Also takes a value, as diffusers: "
                        "--prodigy_decouple false.")
    g.add_argument("--prodigy_use_bias_correction", action=OptionalBool, default=True,
                   help="Prodigy: Adam's bias correction (default: on).")
    g.add_argument("--prodigy_safeguard_warmup", action=OptionalBool, default=True,
                   help="Prodigy: leave the learning rate out of the step-size estimate's denominator during "
                        "warm-up (default: on).")
    g.add_argument("--adam_epsilon", type=finite_float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=finite_float, default=1.0, help="Gradient clipping norm.")
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=False,
                   help="Keep an exponential moving average of the LoRA (and new token) weights, as diffusers' EMAModel; "
                        "the average is what is saved at the end and what validation samples. Checkpoints hold the "
                        "live weights and the average's state, so resuming is exact.")
    g.add_argument("--ema_decay", type=finite_float, default=0.999,
                   help="EMA decay per step (EMAModel warms it up as (1 + step) / (10 + step) until it reaches this).")

    g = p.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", type=path_arg, default="lora-dreambooth-model", help="Where weights and checkpoints go.")
    g.add_argument("--overwrite_output_dir", action=argparse.BooleanOptionalAction, default=False,
                   help="Train into an --output_dir that already holds a finished run, replacing its files (only "
                        "the previous run's own: other files in the folder stay); without it that is refused; "
                        "--resume_from_checkpoint continues a run instead. Never saved in config.yaml.")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save output_dir/checkpoint-N (resumable state + loadable LoRA) every N steps.")
    g.add_argument("--output_kohya_format", action="store_true",
                   help="diffusers' SDXL flag: also write the kohya file (what --output_format both, the default, does).")
    g.add_argument("--output_format", default="both", choices=["diffusers", "kohya", "both"],
                   help="diffusers: pytorch_lora_weights.safetensors (always written, for load_lora_weights and "
                        "resume); kohya/both: also <output_dir name>.safetensors for ComfyUI/A1111.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=path_arg, default=None,
                   help="'latest', a checkpoint name inside output_dir ('checkpoint-500', as diffusers reads it) "
                        "or a checkpoint folder path.")

    g = p.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", default=None, help="Prompt for validation images.")
    g.add_argument("--num_validation_images", type=int, default=4, help="Validation images per run.")
    g.add_argument("--skip_final_inference", action=argparse.BooleanOptionalAction, default=False,
                   help="No validation grid after the last step (diffusers' flag; big models on small GPUs); the "
                        "grids every --validation_steps / --validation_epochs are still made.")
    g.add_argument("--validation_steps", type=int, default=None, help="Run validation every N steps.")
    g.add_argument("--validation_epochs", type=int, default=50,
                   help="With --validation_prompt: validate after epochs 0, N, 2N, ... (as diffusers counts them).")
    g.add_argument("--report_to", default="tensorboard",
                   help="Trackers for accelerate: tensorboard, wandb, comet_ml, all or none, comma-separated "
                        "(each skipped with a warning when not installed).")
    g.add_argument("--logging_dir", default="logs", help="Tracker log folder, relative to output_dir.")
    g.add_argument("--logging_steps", type=int, default=10,
                   help="Read the losses back from the GPU every N steps (progress bar, trackers, NaN check; every "
                        "step is still logged). Each read makes the CPU wait for the GPU; checkpoints, validation "
                        "and the last step always read first.")

    g = p.add_argument_group("Hugging Face Hub")
    g.add_argument("--push_to_hub", action=argparse.BooleanOptionalAction, default=False,
                   help="Create the Hub repo before training (so a bad token fails in seconds) and upload the "
                        "output folder (LoRA files, model card, validation grids; no checkpoints) at the end.")
    g.add_argument("--hub_model_id", default=None,
                   help="Repo to push to, 'user/name' or 'name' (default: the output_dir folder's name).")
    g.add_argument("--hub_token", default=None,
                   help="Hub token with write access (default: the one saved by `huggingface-cli login` or HF_TOKEN).")

    from .families import add_family_flags
    add_family_flags(p)

    g = p.add_argument_group("not supported (DeepFloyd IF, EDM, Ascend NPU flags of diffusers; refused with one line)")
    for flag in IF_ONLY_FLAGS:
        g.add_argument(f"--{flag}", nargs="*", default=None, help="DeepFloyd IF only; refused here.")
    g.add_argument("--enable_npu_flash_attention", action="store_true",
                   help="diffusers' Flux flag for Huawei Ascend NPUs; refused here (PyTorch SDPA is used).")
    g.add_argument("--do_edm_style_training", action="store_true",
                   help="diffusers' SDXL flag for EDM-formulated models (Playground v2.5); refused here.")
    return p


def _read_config_file(path):
    """Keys of a YAML/TOML file as flag defaults; unknown keys are an error, not silently ignored."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: file not found")
    try:
        if path.endswith(".toml"):
            import tomllib
            with open(path, "rb") as f:
                data = tomllib.load(f)
        else:
            import yaml
            with open(path) as f:
                data = yaml.safe_load(f) or {}
    except Exception as e:  # the parser's own message says where
        raise UsageError(f"--config {path}: cannot parse: {str(e).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    return data


TRUE_WORDS, FALSE_WORDS = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _config_tokens(parser, data, path):
    """A config file's keys as command-line tokens, so its values go through exactly the same parser as the
    command line: types, choices, finite floats, `~` expansion. ("false" is false, 4.5 is no int.)"""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    tokens = []
    for key, value in data.items():
        action = actions.get(key)
        if action is None or key in ("help", "config"):
            raise UsageError(f"--config {path}: unknown key '{key}' (keys are flag names without --)")
        flag = action.option_strings[0]
        if value is None:
            continue  # `key:` with no value means "the default"
        if action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction):  # an on/off flag
            word = str(value).strip().lower()
            if word not in TRUE_WORDS + FALSE_WORDS:
                raise UsageError(f"--config {path}: {key}: expected true or false, got {value!r}")
            on = word in TRUE_WORDS
            if isinstance(action, argparse.BooleanOptionalAction):
                tokens.append(flag if on else "--no-" + flag[2:])
            elif on:
                tokens.append(flag)
        elif isinstance(value, list) and key == "lora_target_modules":
            tokens.append(f"{flag}={','.join(map(str, value))}")
        elif isinstance(value, (list, dict)):
            if action.nargs not in ("*", "+"):
                raise UsageError(f"--config {path}: {key}: expected one value, got {type(value).__name__} {value!r}")
            tokens += [flag, *map(str, value)]
        else:
            tokens.append(f"{flag}={value}")  # one token: a value starting with '-' is not taken for a flag
    return tokens


def parse_args(argv=None):
    """Command line over --config file over built-in defaults."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    redaction.remember_from_argv(argv)  # before parsing: an error line that echoes the token is scrubbed too
    # the file's path, found as argparse finds it (`--conf f.yaml` is an accepted abbreviation too)
    config_path = build_parser().parse_known_args(argv)[0].config
    tokens = []
    if config_path:
        data = _read_config_file(config_path)
        redaction.remember(str(data.get("hub_token") or ""))  # even when the command line gives another
        tokens = _config_tokens(parser, data, config_path)
        try:
            parser.parse_args(tokens)  # alone first, so a bad value is reported as the file's
        except UsageError as e:
            raise UsageError(f"--config {config_path}: {e}")
    args = parser.parse_args(tokens + argv)  # later tokens win: the command line over the file
    args.config = config_path
    args._argv = argv  # the command line as given, for the card's Reproduce section (main(argv) need not be sys.argv)
    redaction.remember(args.hub_token)  # also a token that came from the --config file
    # what was asked, before validation and the run fill in the family's defaults and what they decide (None =
    # "decide"): config.yaml records this, so a replay decides again, for its own model and flags
    args._requested = {k: list(v) if isinstance(v, list) else v for k, v in vars(args).items()
                       if not k.startswith("_")}
    if args.local_rank == -1 and os.environ.get("LOCAL_RANK", "").isdigit():  # as diffusers: the launcher's env wins
        args.local_rank = int(os.environ["LOCAL_RANK"])
    return args


# Secrets and per-launch facts: not part of a recipe. A replay must not replace the run it was made from
# (--overwrite_output_dir; the Hub repo it was uploaded to), nor continue the original's checkpoint
# (--resume_from_checkpoint): it uploads only when asked, to the repo it is told or named after its new folder.
NOT_SAVED = ("config", "hub_token", "debug", "local_rank", "overwrite_output_dir", "resume_from_checkpoint",
             "push_to_hub", "hub_model_id")


def _saved(values):
    """Flag name -> value, sorted, without what is not a recipe (NOT_SAVED; validate()'s own `_` entries); tuples
    as lists, as YAML and the trackers take them."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in sorted(values.items())
            if k not in NOT_SAVED and not k.startswith("_")}


def effective_config(args):
    """The parsed flags as a plain dict, without what is not a recipe (the Hub token, per-launch facts)."""
    return _saved(vars(args))


def run_settings(run, record=None):
    """The settings as the run used them (resolved by validate(), then what the run decided: precision, caching),
    as a plain dict: the trackers' config, config.yaml's comments. Never the Hub token."""
    return _saved(dict(run.settings(), **(record.decided() if record else {})))


def recipe(run, record=None):
    """The flags as asked (command line over --config file over defaults): what config.yaml saves. Values the
    family or the run decides (resolution, learning rate, LoRA targets, guidance, cache_latents,
    pre_compute_text_embeddings, mixed precision...) stay undecided, so a replay with another model or one flag
    changed decides them again instead of failing on a flag the user never gave."""
    asked = run.requested or {}
    return {k: asked.get(k, v) for k, v in run_settings(run, record).items()}


def recipe_yaml(run, record=None):
    """config.yaml: the recipe, headed by how to replay it and what this run decided for the values left open."""
    import yaml
    asked, used = recipe(run, record), run_settings(run, record)
    decided = [f"#   {k}: {json.dumps(used[k])}" for k in used if used[k] != asked[k]]
    head = [outputs.RECIPE_MARKER + ": replay it with",  # the marker: how a later run knows the file is ours
            "#   accelerate launch train_dreambooth_lora.py --config <this file> --output_dir <a new folder>"]
    if decided:
        head += ["# Values not given were decided by the run (again by a replay, for its own model); this run used:",
                 *decided]
    return "\n".join(head) + "\n" + yaml.safe_dump(asked, sort_keys=True)


def _instance_folder_images(folder):
    if not folder:
        raise UsageError("--instance_data_dir is required: a folder with 3-20 photos of the subject "
                         "(or --dataset_name)")
    if os.path.isfile(folder):
        raise UsageError(f"--instance_data_dir {folder} is a file; give the folder that holds the photos")
    if not os.path.isdir(folder):
        raise UsageError(f"--instance_data_dir {folder}: folder does not exist")
    images, skipped, captions = list_instance_images(folder)
    if not images:
        what = "is empty" if not os.listdir(folder) else f"has no images ({', '.join(IMAGE_EXTENSIONS)})"
        raise UsageError(f"--instance_data_dir {folder} {what}; add photos of the subject")
    stems = {os.path.splitext(p)[0] for p in images}
    for cap in captions:
        if os.path.splitext(cap)[0] not in stems:
            raise UsageError(f"--instance_data_dir: caption file {cap} has no image of the same name; "
                             "rename it to match an image or move it out")
    return images, skipped


def dataset_to_folder(name, image_column, caption_column, config_name=None, cache_dir=None):
    """A `datasets` dataset written out as image + caption files in a temporary folder, so the rest of the
    pipeline (validation, captions, caching) treats it exactly like --instance_data_dir."""
    import atexit
    import tempfile
    try:
        import datasets
    except ImportError:
        raise UsageError("--dataset_name needs the optional datasets package: pip install datasets")
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        loaded = datasets.load_dataset(name, config_name, cache_dir=cache_dir)
    except Exception as e:
        raise UsageError(f"--dataset_name {name}: cannot load it ({type(e).__name__}: {str(e).splitlines()[0]})")
    split = loaded["train"] if "train" in loaded else loaded[next(iter(loaded))]
    for flag, column in (("--image_column", image_column), ("--caption_column", caption_column)):
        if column is not None and column not in split.column_names:
            raise UsageError(f"{flag} {column}: no such column in {name} (columns: {', '.join(split.column_names)})")
    if len(split) == 0:
        raise UsageError(f"--dataset_name {name}: the dataset has no rows")
    folder = tempfile.mkdtemp(prefix="dreambooth-dataset-")
    atexit.register(shutil.rmtree, folder, True)
    images = []
    from PIL import Image
    from .images import to_rgb
    for i, row in enumerate(split):
        image = row[image_column]
        try:
            if isinstance(image, str):
                image = Image.open(image)
            if not isinstance(image, Image.Image):
                raise TypeError(f"it holds {type(image).__name__}, not an image")
            # as 8-bit RGB now, as images.load_rgb reads files: PNG cannot hold CMYK or float pixels, and a
            # 16-bit one would be read back white
            image = to_rgb(image)
        except Exception as e:
            raise UsageError(f"--image_column {image_column}: row {i} of {name} is not a readable image "
                             f"({first_line(e)}); give the column that holds the images")
        path = os.path.join(folder, f"{i:05d}.png")
        image.save(path)
        images.append(path)
        if caption_column and str(row[caption_column] or "").strip():
            with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(str(row[caption_column]))
    return images


def missing_model_path(value):
    """True when value names no existing file or folder and cannot be a hub id ('org/name') either."""
    if os.path.exists(value):
        return False
    return value.startswith((".", "/", "~")) or value.count("/") > 1 \
        or value.endswith((".safetensors", ".ckpt", ".pt", ".bin")) or not HUB_ID.match(value)


def _check_model(args):
    model = args.pretrained_model_name_or_path
    if not model or not model.strip():
        raise UsageError("--pretrained_model_name_or_path is required (hub id, diffusers folder or .safetensors file)")
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")) and \
                not os.path.isdir(os.path.join(model, "unet")):
            raise UsageError(f"--pretrained_model_name_or_path {model}: folder has no model_index.json or unet/; "
                             "point it at a diffusers pipeline folder")
    elif os.path.isfile(model):
        if not model.endswith((".safetensors", ".ckpt")):
            raise UsageError(f"--pretrained_model_name_or_path {model}: a single-file model must be .safetensors "
                             "or .ckpt")
        problem = sniff_weights_file(model)
        if problem:
            raise UsageError(f"--pretrained_model_name_or_path {model} {problem}; download or convert it again")
    elif missing_model_path(model):
        raise UsageError(f"--pretrained_model_name_or_path {model}: no such file or folder, and not a hub id "
                         "like 'stable-diffusion-v1-5/stable-diffusion-v1-5'")


def _check_prompts(args, notes):
    if args.instance_prompt is None:
        raise UsageError("--instance_prompt is required, e.g. --instance_prompt 'a photo of sks dog'")
    for flag in ("instance_prompt", "class_prompt", "validation_prompt"):
        value = getattr(args, flag)
        if value is not None and not value.strip():
            raise UsageError(f"--{flag} is empty or only whitespace; give a prompt, e.g. 'a photo of sks dog'")
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise UsageError("--with_prior_preservation needs --class_prompt, e.g. --class_prompt 'a photo of dog'")
        if args.prior_preservation_mode == "base_output":
            defaults = {"class_data_dir": None, "prior_generation_precision": None, "sample_with_full_base": False}
            for flag in [f for f, d in defaults.items() if getattr(args, f) != d]:
                notes.append(f"warning: --{flag} has no effect with --prior_preservation_mode base_output (it "
                             "writes no class images; its paths are sampled by the model being trained, in its "
                             "training precision)")
        if args.num_class_images is None:
            args.num_class_images = BASE_OUTPUT_PATHS if args.prior_preservation_mode == "base_output" else 100
        if args.class_data_dir and os.path.isfile(args.class_data_dir):
            raise UsageError(f"--class_data_dir {args.class_data_dir} is a file; give a folder")
    elif args.prior_preservation_mode != "images":
        raise UsageError(f"--prior_preservation_mode {args.prior_preservation_mode} needs --with_prior_preservation "
                         "(and --class_prompt); to train without prior preservation, leave --prior_preservation_mode "
                         "out (or set it to images)")
    elif args.class_prompt or args.class_data_dir:
        notes.append("warning: --class_prompt/--class_data_dir are ignored without --with_prior_preservation")


BASE_OUTPUT_PATHS = 16  # --prior_preservation_mode base_output's default --num_class_images (docs/quality.md)


def _check_numbers(args, notes):
    """Ranges argparse's types cannot express. NaN/inf never get here (finite_float)."""
    if args.resolution is not None and (args.resolution % 8 or args.resolution < 8):
        raise UsageError(f"--resolution must be a positive multiple of 8 (got {args.resolution}); "
                         "try 512 for SD 1.5, 768 for SD 2.1")
    at_least_one = ["train_batch_size", "rank", "gradient_accumulation_steps", "repeats", "num_train_epochs",
                    "checkpointing_steps", "num_validation_images", "logging_steps"]
    if args.with_prior_preservation:
        at_least_one += ["num_class_images", "sample_batch_size", "class_generation_steps"]
    for flag in at_least_one:
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    for flag in ("max_train_steps", "validation_steps", "validation_epochs", "checkpoints_total_limit",
                 "tokenizer_max_length"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    # counts past these are typing slips, and some would overflow (a step count past 2**63) or fill the memory (a
    # list of photo indices a billion long) before the first step
    at_most = {"max_train_steps": 10**9, "num_train_epochs": 10**9, "checkpointing_steps": 10**9,
               "validation_steps": 10**9, "validation_epochs": 10**9, "lr_warmup_steps": 10**9, "logging_steps": 10**9,
               "repeats": 10**4, "rank": 4096, "num_class_images": 10**6, "train_batch_size": 10**4,
               "gradient_accumulation_steps": 10**6, "num_validation_images": 1000}
    for flag, limit in at_most.items():
        value = getattr(args, flag, None)
        if value is not None and value > limit:
            raise UsageError(f"--{flag} {value} is more than {limit:,}, the most this trainer takes; "
                             f"use a smaller value")
    if args.learning_rate is not None and args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0 (got {args.learning_rate}); 1e-4 is a good start")
    positive = {"text_encoder_lr": args.text_encoder_lr, "lora_alpha": args.lora_alpha, "snr_gamma": args.snr_gamma,
                "max_grad_norm": args.max_grad_norm, "adam_epsilon": args.adam_epsilon, "lr_power": args.lr_power}
    for flag, value in positive.items():
        if value is not None and value <= 0:
            raise UsageError(f"--{flag} must be > 0 (got {value})")
    for flag in ("prior_loss_weight", "noise_offset", "adam_weight_decay", "adam_weight_decay_text_encoder"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    for flag in ("adam_beta1", "adam_beta2", "lora_dropout", "caption_dropout_rate", "ema_decay"):
        if not 0 <= getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be in [0, 1) (got {getattr(args, flag)})")
    for flag in ("lr_warmup_steps", "allow_nan_steps", "dataloader_num_workers", "lr_num_cycles"):
        if getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    if args.ddp_timeout < 1:
        raise UsageError(f"--ddp_timeout must be >= 1 second (got {args.ddp_timeout})")
    if args.enable_bucket and (args.bucket_reso_steps < 8 or args.bucket_reso_steps % 8):
        raise UsageError(f"--bucket_reso_steps must be a multiple of 8 (got {args.bucket_reso_steps})")
    warmup_used = args.lr_scheduler != "constant" and args.lr_warmup_steps
    if warmup_used and args.max_train_steps and args.lr_warmup_steps >= args.max_train_steps:
        notes.append(f"warning: --lr_warmup_steps {args.lr_warmup_steps} >= --max_train_steps "
                     f"{args.max_train_steps}: the learning rate never reaches --learning_rate (diffusers' default "
                     "warm-up is 500 steps; lower --lr_warmup_steps)")


def _check_family_defaults(args):
    """Detect the model family (no flag: from the model's own files; for a hub id its model_index.json, the one
    download before loading) and fill in what depends on it: --resolution defaults to the family's (512 SD,
    1024 SDXL, as diffusers' scripts)."""
    from .families import ModelSource, detect
    from .families import resolve_family_flags
    args._family = detect(ModelSource.from_flags(args))
    if args.resolution is None:
        args.resolution = args._family.default_resolution
    resolve_family_flags(args, args._family)
    if args.enable_bucket:
        if not args.min_bucket_reso <= args.resolution <= args.max_bucket_reso:
            raise UsageError(f"--resolution {args.resolution} must lie between --min_bucket_reso "
                             f"{args.min_bucket_reso} and --max_bucket_reso {args.max_bucket_reso}")
        if args.min_bucket_reso % args.bucket_reso_steps or args.max_bucket_reso % args.bucket_reso_steps:
            raise UsageError("--min_bucket_reso and --max_bucket_reso must be multiples of --bucket_reso_steps")


def _check_flags(args, notes):
    """Combinations and optional packages."""
    for flag in IF_ONLY_FLAGS:
        if getattr(args, flag) is not None:
            raise UsageError(f"--{flag} is a DeepFloyd IF option of diffusers' script; this trainer supports "
                             "Stable Diffusion only: drop the flag")
    if args.enable_npu_flash_attention:
        raise UsageError("--enable_npu_flash_attention is for Huawei Ascend NPUs, which this trainer does not run on; "
                         "drop the flag (PyTorch SDPA attention is used)")
    if args.do_edm_style_training:
        raise UsageError("--do_edm_style_training is for EDM-formulated models (Playground v2.5); this trainer "
                         "trains DDPM-formulated SD 1.x/2.x and SDXL models: drop the flag")
    if args.output_kohya_format and args.output_format == "diffusers":
        raise UsageError("--output_kohya_format asks for the kohya file, which --output_format diffusers leaves out; "
                         "drop one of them (the default --output_format both writes it)")
    for flag in ("crops_coords_top_left_h", "crops_coords_top_left_w"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            raise UsageError(f"--{flag} must be >= 0 (got {getattr(args, flag)})")
    for flag in ("lora_target_modules", "lora_layers"):
        if getattr(args, flag) is not None and not [m for m in getattr(args, flag).split(",") if m.strip()]:
            raise UsageError(f"--{flag} is empty; leave it out for the model family's default")
    if args.sample_with_full_base and not (args.quantize_base or args.bnb_quantization_config_path):
        notes.append("warning: --sample_with_full_base has no effect without a quantized base (--quantize_base)")
    if args.train_text_encoder and args.pre_compute_text_embeddings:
        raise UsageError("--pre_compute_text_embeddings cannot be used with --train_text_encoder "
                         "(the embeddings change as the text encoder trains); drop one of them")
    if args.dynamo_backend != "inductor" and not args.torch_compile:
        notes.append(f"note: --dynamo_backend {args.dynamo_backend} has no effect without --torch_compile")
    pivotal.check_flags(args, notes)
    from . import quantize
    args._quantization = quantize.settings(args)  # the package, the JSON file, the combinations: one line each
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UsageError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                         "(PyTorch SDPA is used by default and is as fast on torch>=2)")
    trackers = [t.strip() for t in (args.report_to or "none").split(",")]
    unknown = [t for t in trackers if t not in TRACKERS + ("all", "none")]
    if unknown:
        raise UsageError(f"--report_to {unknown[0]}: unknown tracker; use {', '.join(TRACKERS)}, all or none")
    if "fp16" in (args.mixed_precision, args.prior_generation_precision):
        import torch
        if not torch.cuda.is_available():
            if args.mixed_precision == "fp16":
                notes.append("warning: --mixed_precision fp16 needs a CUDA GPU and none was found; "
                             "falling back to fp32 (--mixed_precision no). bf16 works on CPU.")
                args.mixed_precision = "no"
            if args.prior_generation_precision == "fp16":
                notes.append("warning: --prior_generation_precision fp16 needs a CUDA GPU and none was found; "
                             "generating class images in fp32")
                args.prior_generation_precision = "fp32"


def _check_output(args):
    """Checked before anything loads: a read-only disk or a finished run must not cost a model load."""
    if not args.output_dir or not args.output_dir.strip():
        raise UsageError("--output_dir is empty; give a folder path, e.g. --output_dir work_dirs/sd15_dog")
    if os.path.isfile(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file; give a folder path")
    problem = writable_folder_problem(args.output_dir)
    if problem:
        raise UsageError(f"--output_dir {args.output_dir}: {problem}; choose another folder or fix its permissions")
    finished = os.path.join(args.output_dir, LORA_WEIGHT_NAME)
    if os.path.isfile(finished) and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        raise UsageError(f"--output_dir {args.output_dir} already holds a finished run ({LORA_WEIGHT_NAME}); "
                         "choose another folder, add --overwrite_output_dir to replace it, or continue it with "
                         "--resume_from_checkpoint latest and a higher --max_train_steps")
    from .checkpoints import is_our_checkpoint, list_checkpoints
    unfinished = [os.path.basename(p) for p in list_checkpoints(args.output_dir)
                  if is_our_checkpoint(p)] if not os.path.isfile(finished) else []
    if unfinished and not args.overwrite_output_dir and not args.resume_from_checkpoint:
        # a fresh run would write its checkpoints over these, and 'latest' would later pick the old run's last one
        raise UsageError(f"--output_dir {args.output_dir} holds the checkpoints of an unfinished run (up to "
                         f"{unfinished[-1]}); continue it with --resume_from_checkpoint latest, add "
                         "--overwrite_output_dir to start again, or choose another folder")
    outputs.check_foreign_files(args)  # nothing the run did not write is replaced or deleted, with or without
    outputs.check_folders(args)        # --overwrite_output_dir; and it never writes among the training photos
    if args.with_prior_preservation and args.class_data_dir:
        problem = writable_folder_problem(args.class_data_dir)
        if problem:
            raise UsageError(f"--class_data_dir {args.class_data_dir}: {problem} (missing class images are "
                             "generated into it); choose another folder")


def _find_instance_images(args):
    """(image paths, non-image files skipped): the folder's listing, or the dataset written out as one."""
    if args.dataset_name:
        if args.instance_data_dir:
            raise UsageError("give --dataset_name or --instance_data_dir, not both")
        return dataset_to_folder(args.dataset_name, args.image_column, args.caption_column,
                                 args.dataset_config_name, args.cache_dir), 0
    return _instance_folder_images(args.instance_data_dir)


def _check_data(args, images, skipped, notes):
    """Last: every photo decoded and every caption read, once the cheap checks have passed."""
    notes += check_images(images, "--instance_data_dir", args.resolution)
    check_captions(images)
    pivotal.check_words_used(args, images, notes)
    if skipped:
        notes.append(f"note: --instance_data_dir: skipping {skipped} non-image file(s)")
    if args.with_prior_preservation and args.class_data_dir and os.path.isdir(args.class_data_dir):
        from .priors import GENERATED  # our own generated files are checked as they are written
        user_images = [p for p in list_images(args.class_data_dir) if not GENERATED.match(os.path.basename(p))]
        notes += check_images(user_images, "--class_data_dir", args.resolution)
    return images


def _check_vae(args):
    """A VAE of another family (an SD 1.x VAE on SDXL) trains in the wrong latent space without an error: compared
    by config.json where both are local folders; otherwise when the VAE loads (families/base.py)."""
    from .families.base import check_vae, vae_config_file
    vae, model = args.pretrained_vae_model_name_or_path, args.pretrained_model_name_or_path
    if vae is not None and not vae.strip():
        raise UsageError("--pretrained_vae_model_name_or_path is empty; give a VAE folder or hub id, or leave the flag "
                         "out to use the base's own VAE")
    if vae and missing_model_path(vae):
        raise UsageError(f"--pretrained_vae_model_name_or_path {vae}: folder does not exist; give a VAE folder (with "
                         "config.json, or a model folder with vae/) or a hub id such as madebyollin/sdxl-vae-fp16-fix")
    if vae and os.path.isfile(vae):
        raise UsageError(f"--pretrained_vae_model_name_or_path {vae} is a file; give a VAE folder (with config.json, "
                         "or a model folder with vae/) or a hub id")
    if vae and os.path.isdir(vae) and vae_config_file(vae) is None:
        raise UsageError(f"--pretrained_vae_model_name_or_path {vae} is not a VAE folder (no config.json, no vae/); "
                         "give the folder that holds the VAE's config.json and weights")
    if not vae or not os.path.isdir(vae) or not os.path.isdir(model):
        return
    files = vae_config_file(vae), os.path.join(model, "vae", "config.json")
    if not all(f and os.path.isfile(f) for f in files):
        return
    configs = []
    for file in files:
        try:
            with open(file, encoding="utf-8") as f:
                configs.append(json.load(f))
        except (OSError, ValueError):
            return  # the load names an unreadable file in its own words
    theirs, ours = configs
    check_vae(ours, theirs, vae, args._family.name)


def _check_prompt_lengths(args, images, notes):
    """The prompts that train against the text encoders' lengths, with the tokenizers alone (a model folder; a
    single file is checked once it has loaded)."""
    from . import prompt_lengths
    from .families import ModelSource
    source = ModelSource.from_flags(args)
    options = {flag: getattr(args, flag) for flag in args._family.flags}
    family = prompt_lengths.text_side(args._family, source, options)
    if family is not None:
        prompt_lengths.check_all(family, args, images, prompt_lengths.position_limits(source, family.text_encoder_names),
                                 notes)


def validate(args, warn=print):
    """Every check that needs no model: one-line UsageError naming the flag and the fix. Warnings are
    printed only once all checks pass, so a failing run prints exactly one line. Returns the run's settings,
    resolved and typed (run_config.RunConfig); `args` itself is left as parsed (the checks work on a copy)."""
    import copy
    from .checkpoints import check_resume, lora_settings
    from .hub import check_hub_flags
    from .run_config import RunConfig
    args = copy.deepcopy(args)  # the checks below fill in defaults; the caller's namespace stays as parsed
    args._family, args._lora_targets_flag = None, "--lora_target_modules"
    notes = []
    _check_model(args)
    _check_prompts(args, notes)
    _check_numbers(args, notes)
    _check_flags(args, notes)
    _check_output(args)
    notes += check_hub_flags(args)
    images, skipped = _find_instance_images(args)
    _check_family_defaults(args)  # may download the model's model_index.json: after the local checks
    _check_vae(args)
    check_optimizer_flags(args, notes)  # reads the family's default learning rate
    args.resume_from_checkpoint = check_resume(args)  # compares the family-resolved LoRA targets
    _check_data(args, images, skipped, notes)
    _check_prompt_lengths(args, images, notes)  # needs the captions (read above) and the tokenizers
    for note in notes:
        warn(note)
    return RunConfig.build(args, args._family, images, args._lora_targets_flag, args._quantization,
                           lora_settings(args))
