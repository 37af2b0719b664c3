#!/usr/bin/env python
"""Generate images with a base model (SD 1.x, 2.x, SDXL, SD 3 or Flux.1) plus one or more LoRAs.

example:
  python infer.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --lora work_dirs/sd15_dog --prompt "a photo of sks dog in a bucket" --num_images 4

--lora takes a training output folder, a checkpoint-N folder, or any LoRA .safetensors file
(diffusers or kohya/A1111 layout). Writes <output>/<prompt index>-<image index>-<prompt>.png and
grid.png, only once every image is generated: a failed run leaves no partial files behind.
"""
import argparse
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# stdlib-only imports: --help and flag errors stay instant
from dreambooth.config import OneLineParser, UsageError, finite_float, missing_model_path, seed_int  # noqa: E402
from dreambooth.devices import check_device_name, out_of_memory, pick_device  # noqa: E402
from dreambooth.errors import first_line, run_cli  # noqa: E402
from dreambooth import pivotal  # noqa: E402
from dreambooth.lora_loading import (LORA_MARKERS, check_lora_file, load_embeddings, load_lora,  # noqa: E402
                                     lora_weight_file, safetensors_shapes)
from dreambooth.pivotal import EMB_SUFFIX  # noqa: E402

SCHEDULERS = {"dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
              "unipc": "UniPCMultistepScheduler", "default": None}
# --lora_scale's range: a LoRA is trained at 1, and about -2..2 is where it still draws its subject (or, negative,
# the opposite); past 10 its change outweighs the base's weights tenfold, and a huge scale overflows to NaN, which
# diffusers would save as black images
MAX_LORA_SCALE = 10.0


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's example as written and appends each default, except where there is none to
    show (required flags, switches, None or empty defaults, whose help says what happens instead)."""

    def _get_help_string(self, action):
        if action.required or action.default is None or action.default is False or action.default == [] \
                or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser():
    p = OneLineParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--base", required=True, help="Base model: hub id, diffusers folder, or .safetensors/.ckpt file.")
    p.add_argument("--lora", action="append", default=[],
                   help="LoRA folder or .safetensors file; repeat to stack several (default: none, the base alone).")
    p.add_argument("--lora_scale", action="append", type=finite_float, default=[],
                   help=f"Strength of each --lora, in the same order, from -{MAX_LORA_SCALE:g} to {MAX_LORA_SCALE:g} "
                        "(default: 1.0 each; 0 turns it off, negative inverts it).")
    p.add_argument("--prompt", action="append", required=True, help="Prompt; repeat for several.")
    p.add_argument("--negative_prompt", default=None, help="Negative prompt for every image (default: none).")
    p.add_argument("--num_images", type=int, default=4, help="Images per prompt.")
    p.add_argument("--steps", type=int, default=None,
                   help="Denoising steps (default: the family's: 30 for SD 1.x/2.x and SDXL, 28 for SD 3 and "
                        "Flux.1-dev, 4 for schnell).")
    p.add_argument("--guidance_scale", type=finite_float, default=None,
                   help="Guidance scale (default: the family's: 7.5 for SD 1.x/2.x and SDXL, 7.0 for SD 3, 3.5 for "
                        "Flux.1-dev's distilled guidance, 0 for schnell).")
    p.add_argument("--seed", type=seed_int, default=0, help="Seed (0..2**32-1); image k of a prompt uses seed + k.")
    p.add_argument("--scheduler", default=None, choices=sorted(SCHEDULERS),
                   help="Sampler (default: dpm++ for SD 1.x/2.x and SDXL; SD 3 and Flux.1 take only their own "
                        "flow-matching Euler, 'default').")
    p.add_argument("--height", type=int, default=None, help="Image height (default: the model's size).")
    p.add_argument("--width", type=int, default=None, help="Image width (default: the model's size).")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"],
                   help="auto: fp16 on cuda/mps, fp32 on cpu. fp16 on cpu runs in fp32 with a warning "
                        "(CPU fp16 kernels are slow or missing).")
    p.add_argument("--output", default="outputs", help="Folder for the PNGs and grid.png.")
    p.add_argument("--debug", action="store_true",
                   help="Show the full Python traceback on errors (for bug reports); same as DREAMBOOTH_DEBUG=1.")
    return p


def check(args):
    """Every check that needs no model (and no torch import): a typo costs a second, not a model load."""
    base = args.base
    if os.path.isdir(base) and not os.path.isfile(os.path.join(base, "model_index.json")):
        raise UsageError(f"--base {base}: folder has no model_index.json; point it at a diffusers pipeline folder "
                         "(or give a .safetensors/.ckpt file)")
    if os.path.isfile(base) and not base.endswith((".safetensors", ".ckpt")):
        raise UsageError(f"--base {base}: a single-file model must be .safetensors or .ckpt")
    if missing_model_path(base):
        raise UsageError(f"--base {base}: no such file or folder, and not a hub id")
    if args.lora_scale and len(args.lora_scale) != len(args.lora):
        raise UsageError(f"--lora_scale given {len(args.lora_scale)} times for {len(args.lora)} --lora; give one each")
    for scale in args.lora_scale:
        if abs(scale) > MAX_LORA_SCALE:
            raise UsageError(f"--lora_scale {scale:g}: out of range; give a strength from -{MAX_LORA_SCALE:g} to "
                             f"{MAX_LORA_SCALE:g} (1 is the LoRA as trained, 0 turns it off)")
    for lora in args.lora:
        if not os.path.exists(lora):
            raise UsageError(f"--lora {lora}: no such file or folder")
        if os.path.isdir(lora) and not any(n.endswith(".safetensors") and not n.endswith(EMB_SUFFIX)
                                           for n in os.listdir(lora)):
            raise UsageError(f"--lora {lora}: folder has no .safetensors file")
        check_lora_file(lora)
    clash = pivotal.word_clash(args.lora)  # also refuses a LoRA whose embeddings file is missing
    if clash:
        raise UsageError(clash)
    if args.num_images < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--num_images and --steps must be >= 1")
    for flag in ("height", "width"):
        if getattr(args, flag) is not None and (getattr(args, flag) < 8 or getattr(args, flag) % 8):
            raise UsageError(f"--{flag} must be a multiple of 8, at least 8 (got {getattr(args, flag)}); leave it "
                             "out for the model's own size")
    check_device_name("--device", args.device)
    if os.path.isfile(args.output):
        raise UsageError(f"--output {args.output} is a file; give a folder")
    parent = os.path.abspath(args.output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--output {args.output}: cannot create it, {parent} is not a writable folder")


def load_base(base, dtype):
    """The pipeline, with every way a user's base can fail to load turned into one line naming it."""
    from diffusers import DiffusionPipeline
    from huggingface_hub.constants import HF_HUB_OFFLINE

    from dreambooth.families import ModelSource, detect
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
    if base.endswith(".safetensors") and os.path.isfile(base):
        keys = safetensors_shapes("--base", base)
        if any(m in k for k in keys for m in LORA_MARKERS):
            raise UsageError(f"--base {base} is a LoRA; pass it as --lora, with the model it was trained on as --base")
        if not any(k.startswith(("model.diffusion_model.", "double_blocks.", "joint_blocks.")) for k in keys):
            raise UsageError(f"--base {base}: not a Stable Diffusion checkpoint (no model.diffusion_model.* weights); "
                             "give an SD 1.x/2.x, SDXL, SD 3 or Flux.1 checkpoint or a diffusers folder")
    if os.path.exists(base):  # the family's pipeline, read from the model's own files (no download)
        family = detect(ModelSource(base), flag="--base")
        pipeline_class, kwargs = family.pipeline_class(), dict(family.single_file_extras, torch_dtype=dtype,
                                                               **family.from_pretrained_extras(base))
    else:  # a hub id: DiffusionPipeline picks the class from its model_index.json, errors handled below
        pipeline_class = DiffusionPipeline
        kwargs = {"torch_dtype": dtype, "safety_checker": None, "requires_safety_checker": False}
    try:
        if os.path.isfile(base):
            return pipeline_class.from_single_file(base, **kwargs)
        return pipeline_class.from_pretrained(base, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # hub, file and state-dict errors; not our bugs
        chain = [e]  # diffusers wraps hub errors in a paragraph of its own; the cause says what happened
        while chain[-1].__cause__ or chain[-1].__context__:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        offline = "HF_HUB_OFFLINE=1 forbids downloading"
        if os.path.isfile(base) and isinstance(e, LocalEntryNotFoundError):  # the config diffusers looks up
            why = f"{offline} it" if HF_HUB_OFFLINE else "the network could not reach the Hub"
            msg = (f"loading a single file needs its pipeline config from the Hugging Face Hub, and {why}; "
                   "run once online to cache it, or give a diffusers folder")
        elif os.path.isfile(base) and "Unable to load weights" in str(e):
            msg = "cannot read the file (truncated, corrupt or not a checkpoint); download or copy it again"
        elif os.path.exists(base):
            msg = f"cannot load it ({first_line(e)})"
        elif any(isinstance(c, RepositoryNotFoundError) for c in chain):
            msg = "no such model on the Hugging Face Hub (or it is private: log in with `hf auth login`)"
        elif HF_HUB_OFFLINE:
            msg = f"not in the local Hugging Face cache, and {offline} it; unset HF_HUB_OFFLINE or give a folder"
        else:
            msg = (f"the network could not reach the Hugging Face Hub to download it ({first_line(chain[-1])}); "
                   "check the connection, or give a local folder")
        raise UsageError(f"--base {base}: {msg}") from e


def trigger_phrase(lora):
    """The phrase a LoRA was trained with, from the header of its file or, for a folder, of any LoRA file in it
    (our diffusers file does not carry it; the kohya file beside it does)."""
    from safetensors import safe_open

    from dreambooth.kohya_metadata import trigger_phrase as from_header
    paths = [lora_weight_file(lora)]
    if os.path.isdir(lora):
        paths += sorted(os.path.join(lora, n) for n in os.listdir(lora) if n.endswith(".safetensors"))
    for path in dict.fromkeys(paths):
        try:
            with safe_open(path, "pt") as f:
                found = from_header(f.metadata() or {})
        except Exception:  # unreadable files were refused already; a stray one is not worth failing over
            continue
        if found:
            return found
    return None


def trigger_notes(loras, prompts):
    """One note per LoRA whose trigger phrase some --prompt lacks: without it a DreamBooth LoRA mostly does nothing."""
    notes = []
    for lora in loras:
        phrase = trigger_phrase(lora)
        missing = [p for p in prompts if phrase and phrase.lower() not in p.lower()]
        if missing:
            notes.append(f"infer.py: note: --lora {lora} was trained with the trigger words \"{phrase}\", which "
                         f"--prompt \"{missing[0]}\"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''} "
                         "does not contain; add them to get the trained subject")
    return notes


def check_sampling(args, pipe, family, steps):
    """The flags that depend on the loaded model: image sides its pipeline takes, steps its sampler has."""
    multiple = family.sampling_size_multiple(pipe)
    for flag in ("height", "width"):
        value = getattr(args, flag)
        if value is not None and value % multiple:
            raise UsageError(f"--{flag} {value}: {family.name} makes images whose sides are multiples of {multiple}; "
                             f"give {value // multiple * multiple or multiple} or {(value // multiple + 1) * multiple}")
    limit = pipe.scheduler.config.get("num_train_timesteps") or 1000
    if steps > limit:
        raise UsageError(f"--steps {steps}: more than the {limit} noise levels the model was trained on; give at most "
                         f"{limit} (the family's default, {family.inference_defaults(pipe)[0]}, is usually enough)")


def nan_cause(args, dtype, guidance):
    """The flag most likely to have made the images NaN, and its fix: the half-precision range, then the strengths
    that multiply the model's change, then the model itself."""
    if abs(guidance) > 30:
        return f"--guidance_scale {guidance:g} amplifies the prompt's push past the number range; use 1-15"
    if dtype == "fp16":
        return "--dtype fp16 overflowed (some models do in half precision); use --dtype bf16 or fp32"
    scales = args.lora_scale or [1.0] * len(args.lora)
    if any(abs(s) > 2 for s in scales):
        return f"--lora_scale {max(scales, key=abs):g} pushes the LoRA past the number range; use -2 to 2"
    if args.lora:
        return ("a --lora overflows this base (compare with --lora_scale 0, which turns it off); lower --lora_scale, "
                "or use an earlier checkpoint-N of its run")
    return "--base gives non-finite numbers (a corrupt or badly converted copy?); download or convert it again"


def main(argv=None):
    return run_cli("infer.py", _main, argv)


def _main(argv):
    args = build_parser().parse_args(argv)
    check(args)

    from dreambooth.quiet import quiet_libraries
    quiet_libraries()  # first: some notices are printed at import time
    import diffusers
    import numpy as np
    import torch

    from dreambooth.validation import image_grid, save_png

    device = pick_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else "fp32" if device == "cpu" else "fp16"
    if dtype == "fp16" and device == "cpu":
        print("infer.py: warning: --dtype fp16 on cpu is slow or unsupported; using fp32", file=sys.stderr)
        dtype = "fp32"
    pipe = load_base(args.base, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype])
    from dreambooth.families import family_of_pipeline
    family = family_of_pipeline(pipe)
    flow = family.own_sampler_only
    if flow and args.scheduler not in (None, "default"):
        raise UsageError(f"--scheduler {args.scheduler}: {family.name} is a flow-matching model and samples with its "
                         "own scheduler; leave --scheduler out (or give 'default')")
    scheduler = args.scheduler or ("default" if flow else "dpm++")
    if SCHEDULERS[scheduler]:
        pipe.scheduler = getattr(diffusers, SCHEDULERS[scheduler]).from_config(pipe.scheduler.config)
    default_steps, default_guidance = family.inference_defaults(pipe)
    steps = args.steps or default_steps
    guidance = default_guidance if args.guidance_scale is None else args.guidance_scale
    check_sampling(args, pipe, family, steps)
    problem = family.sampling_flag_problem(pipe, args.negative_prompt, args.guidance_scale, guidance)
    if problem:
        raise UsageError(problem)
    names, token_map = [], {}
    for i, lora in enumerate(args.lora):
        names.append(f"lora{i}")
        token_map.update(load_lora(pipe, lora, names[-1], args.base))  # embeddings bundled in the file, if any
        token_map.update(load_embeddings(pipe, lora))
    if token_map:
        words = ", ".join(f"{w} -> {''.join(t)}" for w, t in token_map.items())
        print(f"infer.py: new tokens loaded: {words}", file=sys.stderr)
    from dreambooth.pivotal import rewrite  # pivotal tuning: TOK -> <s0><s1>, as the run's prompts were
    if names:
        pipe.set_adapters(names, adapter_weights=args.lora_scale or [1.0] * len(names))
    for note in trigger_notes(args.lora, args.prompt):
        print(note, file=sys.stderr)
    from dreambooth.prompt_lengths import check_inference_prompts
    notes = []  # the pipeline cuts prompts at its tokenizers' lengths (diffusers' own warning is quieted)
    check_inference_prompts(pipe, family, args.prompt, token_map, notes)
    for note in notes:
        print(f"infer.py: {note}", file=sys.stderr)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    files = {}  # generated in full before anything is written: a failure or Ctrl-C leaves no partial output
    for p, prompt in enumerate(args.prompt):
        generators = [torch.Generator("cpu").manual_seed(args.seed + k) for k in range(args.num_images)]
        try:  # as numbers first: diffusers turns NaN into black pixels without a word
            batch = pipe(rewrite(prompt, token_map), negative_prompt=args.negative_prompt,
                         num_images_per_prompt=args.num_images, num_inference_steps=steps, guidance_scale=guidance,
                         generator=generators, height=args.height, width=args.width, output_type="np").images
        except Exception as e:
            if out_of_memory(e):
                size = f"{args.height or family.default_size(pipe)}x{args.width or family.default_size(pipe)}"
                raise UsageError(f"out of memory on {device} making {args.num_images} image(s) of {size} at once; "
                                 "lower --num_images (one batch per prompt) or --height/--width, or use --dtype fp16 "
                                 "on a GPU") from e
            raise
        if not np.isfinite(batch).all():
            raise UsageError(f"--prompt \"{prompt}\": the images came out as NaN (not-a-number pixels, which "
                             f"diffusers would save as black squares); {nan_cause(args, dtype, guidance)}; nothing "
                             "was written")
        batch = pipe.image_processor.numpy_to_pil(batch)
        slug = re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")[:40]
        files.update({f"{p:02d}-{k:02d}-{slug}.png": image for k, image in enumerate(batch)})
    files["grid.png"] = image_grid(list(files.values()))
    try:
        for name, image in files.items():
            save_png(image, os.path.join(args.output, name))  # temporary name, then rename
    except OSError as e:
        raise UsageError(f"--output {args.output}: cannot write {name} ({first_line(e)})") from e
    n = len(files) - 1
    print(f"wrote {n} image{'s' if n != 1 else ''} and grid.png to {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
