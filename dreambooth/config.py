"""Flags, --config files and fail-fast validation.

Everything here runs before any model is loaded: a bad flag must cost the user a second,
not a 30-minute class-image generation. Flag names and meanings follow diffusers'
examples/dreambooth/train_dreambooth_lora.py so existing commands run unchanged.
"""
import argparse
import importlib.util
import os
import re
import shutil
import sys

from .errors import UsageError  # noqa: F401  (re-exported: callers import it from here too)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
LR_SCHEDULERS = ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"]
INTERPOLATION_MODES = ["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
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


class OneLineParser(argparse.ArgumentParser):
    """argparse prints the whole usage block on error; we print one line that names the flag."""

    def error(self, message):
        raise UsageError(message)


def build_parser():
    p = OneLineParser(
        description="DreamBooth LoRA training for Stable Diffusion 1.x/2.x (diffusers-compatible flags).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("config file")
    g.add_argument("--config", default=None,
                   help="YAML or TOML file whose keys are flag names (without --). Command-line flags win. "
                        "The effective config is saved as output_dir/config.yaml.")

    g.add_argument("--debug", action="store_true",
                   help="Show the full Python traceback on errors (for bug reports); same as DREAMBOOTH_DEBUG=1.")

    g = p.add_argument_group("base model")
    g.add_argument("--pretrained_model_name_or_path", default=None,
                   help="Hub id, local diffusers folder, or a single .safetensors/.ckpt checkpoint file.")
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of the base model.")
    g.add_argument("--variant", default=None, help="Weight variant of the base model files, e.g. fp16.")
    g.add_argument("--tokenizer_name", default=None, help="Tokenizer to use instead of the base model's own.")
    g.add_argument("--single_file_config", default=None,
                   help="For a single-file base model: hub id or diffusers folder whose configs describe its "
                        "architecture (default: let diffusers infer it, which needs the hub).")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"],
                   help="Override the scheduler's prediction type (default: the base model's own).")

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default=None,
                   help="Folder of subject photos (jpg/png/webp/bmp). 'photo.txt' beside 'photo.jpg' is its caption.")
    g.add_argument("--dataset_name", default=None,
                   help="Instead of --instance_data_dir: a Hugging Face dataset id or local dataset path "
                        "(needs the optional `datasets` package).")
    g.add_argument("--image_column", default="image", help="Dataset column holding the images.")
    g.add_argument("--caption_column", default=None,
                   help="Dataset column holding per-image captions (default: --instance_prompt for all).")
    g.add_argument("--instance_prompt", default=None, help="Prompt naming the subject, e.g. 'a photo of sks dog'.")
    g.add_argument("--class_data_dir", default=None,
                   help="Folder of class-prior images; missing ones are generated (default: output_dir/class_images).")
    g.add_argument("--class_prompt", default=None, help="Prompt for the class, e.g. 'a photo of dog'.")
    g.add_argument("--resolution", type=int, default=512, help="Training resolution in pixels (multiple of 8).")
    g.add_argument("--center_crop", action="store_true", help="Center-crop instead of random-crop to the resolution.")
    g.add_argument("--random_flip", action="store_true", help="Randomly flip training images horizontally.")
    g.add_argument("--repeats", type=int, default=1, help="How many times each instance image is seen per epoch.")
    g.add_argument("--image_interpolation_mode", default="lanczos", choices=INTERPOLATION_MODES,
                   help="Resampling filter used when resizing images.")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="DataLoader worker processes (0 = load in the main process).")
    g.add_argument("--enable_bucket", action="store_true",
                   help="Aspect-ratio bucketing: non-square photos keep their shape instead of being cropped square.")
    g.add_argument("--min_bucket_reso", type=int, default=256, help="Smallest bucket side in pixels.")
    g.add_argument("--max_bucket_reso", type=int, default=1024, help="Largest bucket side in pixels.")
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="Bucket sides are multiples of this.")
    g.add_argument("--cache_latents", action="store_true",
                   help="Encode every image with the VAE once and free the VAE during training.")

    g = p.add_argument_group("prior preservation")
    g.add_argument("--with_prior_preservation", action="store_true",
                   help="Train on class images too, so the model keeps its idea of the class.")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="Weight of the class (prior) loss.")
    g.add_argument("--num_class_images", type=int, default=100,
                   help="How many class images to use; missing ones are generated with the base model.")
    g.add_argument("--sample_batch_size", type=int, default=4, help="Batch size when generating class images.")
    g.add_argument("--class_generation_steps", type=int, default=25,
                   help="DPM-Solver++ steps per generated class image.")
    g.add_argument("--prior_generation_precision", default=None, choices=["no", "fp32", "fp16", "bf16"],
                   help="Precision for class-image generation (default: fp16 on CUDA, fp32 elsewhere).")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (dimension of the update matrices).")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha; the update is scaled by alpha/rank "
                   "(default: equal to rank, scale 1).")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="Dropout on the LoRA branch.")
    g.add_argument("--use_dora", action="store_true", help="Weight-decomposed LoRA (DoRA).")
    g.add_argument("--lora_target_modules", default="to_q,to_k,to_v,to_out.0",
                   help="Comma-separated UNet module names that get LoRA.")
    g.add_argument("--train_text_encoder", action="store_true",
                   help="Also train LoRA on the text encoder's attention (q,k,v,out projections).")

    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="lora-dreambooth-model", help="Where weights and checkpoints go.")
    g.add_argument("--seed", type=int, default=None, help="Seed for reproducible training and class images.")
    g.add_argument("--train_batch_size", type=int, default=4, help="Instance images per device per step.")
    g.add_argument("--num_train_epochs", type=int, default=1, help="Epochs (ignored when max_train_steps is set).")
    g.add_argument("--max_train_steps", type=int, default=None, help="Total optimizer steps; overrides epochs.")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="Micro-batches per optimizer step.")
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="Recompute activations in backward to save memory (slower).")
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"],
                   help="Mixed precision (default: from `accelerate config`). Frozen weights use this dtype, "
                        "LoRA weights stay fp32.")
    g.add_argument("--allow_tf32", action="store_true", help="Allow TF32 matmuls on Ampere+ GPUs.")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="Use xformers attention (default is PyTorch SDPA).")
    g.add_argument("--pre_compute_text_embeddings", action="store_true",
                   help="Encode the fixed prompts once and free the text encoder (not with --train_text_encoder).")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting gamma (5.0 is common).")
    g.add_argument("--noise_offset", type=float, default=0.0, help="Noise offset (0.1 is common).")
    g.add_argument("--ddp_timeout", type=int, default=1800,
                   help="Seconds a process waits for the others before giving up (multi-GPU), so a dead rank "
                        "ends the run instead of hanging it.")
    g.add_argument("--allow_nan_steps", type=int, default=0,
                   help="How many non-finite-loss steps to skip before stopping. Above 0 the loss is read back "
                        "before every update (a host sync per step).")

    g = p.add_argument_group("optimizer and schedule")
    g.add_argument("--learning_rate", type=float, default=1e-4, help="Learning rate of the UNet LoRA.")
    g.add_argument("--text_encoder_lr", type=float, default=None,
                   help="Learning rate of the text-encoder LoRA (default: learning_rate).")
    g.add_argument("--scale_lr", action="store_true",
                   help="Multiply learning rates by batch size x accumulation x processes.")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS, help="Learning-rate schedule.")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="Warm-up steps of the schedule.")
    g.add_argument("--lr_num_cycles", type=int, default=1, help="Restarts for cosine_with_restarts.")
    g.add_argument("--lr_power", type=float, default=1.0, help="Power of the polynomial schedule.")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes 8-bit AdamW (less optimizer memory).")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1.")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2.")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay.")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon.")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="Gradient clipping norm.")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=500,
                   help="Save output_dir/checkpoint-N (resumable state + loadable LoRA) every N steps.")
    g.add_argument("--output_format", default="both", choices=["diffusers", "kohya", "both"],
                   help="diffusers: pytorch_lora_weights.safetensors (always written, for load_lora_weights and "
                        "resume); kohya/both: also <output_dir name>.safetensors for ComfyUI/A1111.")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' or a checkpoint folder path to resume from.")

    g = p.add_argument_group("validation and logging")
    g.add_argument("--validation_prompt", default=None, help="Prompt for validation images.")
    g.add_argument("--num_validation_images", type=int, default=4, help="Validation images per run.")
    g.add_argument("--validation_steps", type=int, default=None, help="Run validation every N steps.")
    g.add_argument("--validation_epochs", type=int, default=None, help="Run validation every N epochs.")
    g.add_argument("--report_to", default="none",
                   help="Trackers for accelerate: tensorboard, wandb, all or none (skipped with a warning "
                        "when not installed).")
    g.add_argument("--logging_dir", default="logs", help="Tracker log folder, relative to output_dir.")
    g.add_argument("--logging_steps", type=int, default=10,
                   help="Read the losses back from the GPU every N steps (progress bar, trackers, NaN check; every "
                        "step is still logged). Each read makes the CPU wait for the GPU; checkpoints, validation "
                        "and the last step always read first.")
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


def parse_args(argv=None):
    """Command line over --config file over built-in defaults."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    config_path = None
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif a.startswith("--config="):
            config_path = a.split("=", 1)[1]
    if config_path:
        data = _read_config_file(config_path)
        known = {a.dest: a for a in parser._actions}
        for key, value in data.items():
            if key not in known or key in ("help", "config"):
                raise UsageError(f"--config {config_path}: unknown key '{key}' (keys are flag names without --)")
            if isinstance(value, list) and key == "lora_target_modules":
                value = ",".join(value)
            parser.set_defaults(**{key: value})
    args = parser.parse_args(argv)
    args.config = config_path
    return args


def effective_config(args):
    """The flags as a plain dict, for output_dir/config.yaml and the model card."""
    return {k: v for k, v in sorted(vars(args).items()) if k != "config" and not k.startswith("_")}


def list_instance_images(folder):
    """Image files and stray caption files of a folder, sorted so runs are reproducible."""
    images, skipped, captions = [], 0, []
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if not os.path.isfile(path) or name.startswith("."):
            continue
        ext = os.path.splitext(name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            images.append(path)
        elif ext == ".txt":
            captions.append(path)
        else:
            skipped += 1
    return images, skipped, captions


def _instance_folder_images(folder):
    if not folder:
        raise UsageError("--instance_data_dir is required: a folder with 3-20 photos of the subject "
                         "(or --dataset_name)")
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


def dataset_to_folder(name, image_column, caption_column):
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
        loaded = datasets.load_dataset(name)
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
    for i, row in enumerate(split):
        image = row[image_column]
        if isinstance(image, str):
            from PIL import Image
            image = Image.open(image)
        path = os.path.join(folder, f"{i:05d}.png")
        image.save(path)
        images.append(path)
        if caption_column and row[caption_column]:
            with open(os.path.join(folder, f"{i:05d}.txt"), "w", encoding="utf-8") as f:
                f.write(str(row[caption_column]))
    return images


def _check_images(images):
    from PIL import Image
    for path in images:
        try:
            with Image.open(path) as im:
                im.load()  # decodes fully: catches truncated files that verify() lets through
        except Exception as e:
            raise UsageError(f"--instance_data_dir: cannot read image {path} ({type(e).__name__}: {e}); "
                             "fix or remove the file")


def missing_model_path(value):
    """True when value names no existing file or folder and cannot be a hub id ('org/name') either."""
    if os.path.exists(value):
        return False
    return value.startswith((".", "/", "~")) or value.count("/") > 1 \
        or value.endswith((".safetensors", ".ckpt", ".pt", ".bin")) or not HUB_ID.match(value)


def validate(args, warn=print):
    """Every check that needs no model: one-line UsageError naming the flag and the fix. Warnings are
    printed only once all checks pass, so a failing run prints exactly one line."""
    notes = []
    if not args.pretrained_model_name_or_path:
        raise UsageError("--pretrained_model_name_or_path is required (hub id, diffusers folder or .safetensors file)")
    model = args.pretrained_model_name_or_path
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "model_index.json")) and \
                not os.path.isdir(os.path.join(model, "unet")):
            raise UsageError(f"--pretrained_model_name_or_path {model}: folder has no model_index.json or unet/; "
                             "point it at a diffusers pipeline folder")
    elif os.path.isfile(model):
        if not model.endswith((".safetensors", ".ckpt")):
            raise UsageError(f"--pretrained_model_name_or_path {model}: a single-file model must be .safetensors "
                             "or .ckpt")
    elif missing_model_path(model):
        raise UsageError(f"--pretrained_model_name_or_path {model}: no such file or folder, and not a hub id "
                         "like 'stable-diffusion-v1-5/stable-diffusion-v1-5'")

    if not args.instance_prompt:
        raise UsageError("--instance_prompt is required, e.g. --instance_prompt 'a photo of sks dog'")
    if args.with_prior_preservation:
        if not args.class_prompt:
            raise UsageError("--with_prior_preservation needs --class_prompt, e.g. --class_prompt 'a photo of dog'")
        if args.num_class_images < 1:
            raise UsageError(f"--num_class_images must be >= 1 (got {args.num_class_images})")
        if args.sample_batch_size < 1:
            raise UsageError(f"--sample_batch_size must be >= 1 (got {args.sample_batch_size})")
        if args.class_generation_steps < 1:
            raise UsageError(f"--class_generation_steps must be >= 1 (got {args.class_generation_steps})")
        if args.class_data_dir and os.path.isfile(args.class_data_dir):
            raise UsageError(f"--class_data_dir {args.class_data_dir} is a file; give a folder")
    else:
        if args.class_prompt or args.class_data_dir:
            notes.append("warning: --class_prompt/--class_data_dir are ignored without --with_prior_preservation")

    if args.resolution % 8 or args.resolution < 64:
        raise UsageError(f"--resolution must be a multiple of 8 and at least 64 (got {args.resolution}); "
                         "try 512 for SD 1.5, 768 for SD 2.1")
    for flag in ("train_batch_size", "rank", "gradient_accumulation_steps", "repeats", "num_train_epochs",
                 "checkpointing_steps", "num_validation_images", "logging_steps"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    for flag in ("max_train_steps", "validation_steps", "validation_epochs", "checkpoints_total_limit"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} must be >= 1 (got {getattr(args, flag)})")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be > 0 (got {args.learning_rate}); 1e-4 is a good start")
    if args.text_encoder_lr is not None and args.text_encoder_lr <= 0:
        raise UsageError(f"--text_encoder_lr must be > 0 (got {args.text_encoder_lr})")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError(f"--lora_dropout must be in [0, 1) (got {args.lora_dropout})")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise UsageError(f"--lora_alpha must be > 0 (got {args.lora_alpha})")
    if args.lr_warmup_steps < 0 or args.allow_nan_steps < 0 or args.dataloader_num_workers < 0:
        raise UsageError("--lr_warmup_steps, --allow_nan_steps and --dataloader_num_workers must be >= 0")
    if args.enable_bucket:
        if args.bucket_reso_steps < 8 or args.bucket_reso_steps % 8:
            raise UsageError(f"--bucket_reso_steps must be a multiple of 8 (got {args.bucket_reso_steps})")
        if not args.min_bucket_reso <= args.resolution <= args.max_bucket_reso:
            raise UsageError(f"--resolution {args.resolution} must lie between --min_bucket_reso "
                             f"{args.min_bucket_reso} and --max_bucket_reso {args.max_bucket_reso}")
        if args.min_bucket_reso % args.bucket_reso_steps or args.max_bucket_reso % args.bucket_reso_steps:
            raise UsageError("--min_bucket_reso and --max_bucket_reso must be multiples of --bucket_reso_steps")
    if args.ddp_timeout < 1:
        raise UsageError(f"--ddp_timeout must be >= 1 second (got {args.ddp_timeout})")
    if not [m for m in args.lora_target_modules.split(",") if m.strip()]:
        raise UsageError("--lora_target_modules is empty; the default is to_q,to_k,to_v,to_out.0")
    if args.train_text_encoder and args.pre_compute_text_embeddings:
        raise UsageError("--pre_compute_text_embeddings cannot be used with --train_text_encoder "
                         "(the embeddings change as the text encoder trains); drop one of them")
    if args.use_dora and args.output_format == "kohya":
        raise UsageError("--use_dora cannot be written in the kohya layout; use --output_format diffusers")
    if args.use_dora and args.output_format == "both":
        notes.append("note: --use_dora: writing the diffusers file only (the kohya layout has no DoRA)")
        args.output_format = "diffusers"
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes (or drop the flag)")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UsageError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers "
                         "(PyTorch SDPA is used by default and is as fast on torch>=2)")

    trackers = [t.strip() for t in (args.report_to or "none").split(",")]
    unknown = [t for t in trackers if t not in ("tensorboard", "wandb", "all", "none")]
    if unknown:
        raise UsageError(f"--report_to {unknown[0]}: unknown tracker; use tensorboard, wandb, all or none")
    if os.path.isfile(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir} is a file; give a folder path")
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest" \
            and not os.path.isdir(args.resume_from_checkpoint):
        raise UsageError(f"--resume_from_checkpoint {args.resume_from_checkpoint}: folder does not exist; "
                         "use 'latest' or an output_dir/checkpoint-N folder")

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
    # Last: the checks that read every photo (or load a dataset), once the cheap ones have passed.
    if args.dataset_name:
        if args.instance_data_dir:
            raise UsageError("give --dataset_name or --instance_data_dir, not both")
        images, skipped = dataset_to_folder(args.dataset_name, args.image_column, args.caption_column), 0
    else:
        images, skipped = _instance_folder_images(args.instance_data_dir)
    _check_images(images)
    if skipped:
        notes.append(f"note: --instance_data_dir: skipping {skipped} non-image file(s)")
    for note in notes:
        warn(note)
    return images


def check_free_space(folder, needed_bytes, what):
    """Fail early with the numbers instead of dying mid-save with a half-written file."""
    probe = folder
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    free = shutil.disk_usage(probe or ".").free
    if free < needed_bytes:
        raise UsageError(f"not enough disk space in {folder} for {what}: need {needed_bytes / 2**20:.1f} MiB, "
                         f"{free / 2**20:.1f} MiB free; free some space or choose another --output_dir")
