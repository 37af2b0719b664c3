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
import contextlib
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# stdlib-only imports: --help and flag errors stay instant
from dreambooth.config import OneLineParser, UsageError, finite_float, missing_model_path, seed_int  # noqa: E402
from dreambooth.errors import first_line, run_cli  # noqa: E402
from dreambooth.pivotal import EMB_SUFFIX  # noqa: E402

SCHEDULERS = {"dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler",
              "euler_a": "EulerAncestralDiscreteScheduler", "ddim": "DDIMScheduler", "pndm": "PNDMScheduler",
              "unipc": "UniPCMultistepScheduler", "default": None}
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")
# the text-conditioning width a UNet's cross-attention reads tells the UNet families apart
FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}


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
                   help="Strength of each --lora, in the same order (default: 1.0 each).")
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
    for lora in args.lora:
        if not os.path.exists(lora):
            raise UsageError(f"--lora {lora}: no such file or folder")
        if os.path.isdir(lora) and not any(n.endswith(".safetensors") and not n.endswith(EMB_SUFFIX)
                                           for n in os.listdir(lora)):
            raise UsageError(f"--lora {lora}: folder has no .safetensors file")
    if args.num_images < 1 or (args.steps is not None and args.steps < 1):
        raise UsageError("--num_images and --steps must be >= 1")
    for flag in ("height", "width"):
        if getattr(args, flag) is not None and getattr(args, flag) % 8:
            raise UsageError(f"--{flag} must be a multiple of 8")
    if not DEVICE.match(args.device):
        raise UsageError(f"--device {args.device}: unknown device; use auto, cpu, cuda, cuda:N or mps")
    if os.path.isfile(args.output):
        raise UsageError(f"--output {args.output} is a file; give a folder")
    parent = os.path.abspath(args.output)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"--output {args.output}: cannot create it, {parent} is not a writable folder")


def pick_device(name):
    """The device to run on, refused before any model loads if this machine lacks it."""
    import torch
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                         "use --device cpu or auto")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not mps:
        raise UsageError("--device mps: torch sees no Apple MPS device here; use --device cpu or auto")
    return name


def safetensors_shapes(flag, path):
    """Every tensor's name and shape from the header alone: a truncated or non-safetensors file is named
    here, before diffusers turns it into a paragraph about something else."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            return {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error type, or OSError, for unreadable files
        raise UsageError(f"{flag} {path}: not a readable .safetensors file (truncated or corrupt: "
                         f"{first_line(e)}); download or copy it again") from e


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


def lora_weight_file(path):
    """A folder may hold our diffusers file, a kohya file, or both: prefer the diffusers one."""
    if not os.path.isdir(path):
        return path
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") and not n.endswith(EMB_SUFFIX))
    return os.path.join(path, "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in names
                        else names[0])


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


@contextlib.contextmanager
def diffusers_log():
    """Collects what diffusers logs instead of printing it: it reports LoRA keys that fit no layer only as a
    warning (and a failed load as an error paragraph before raising), and we decide what the user sees."""
    import logging
    import warnings
    logger, records = logging.getLogger("diffusers"), []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    saved = logger.handlers, logger.level
    logger.handlers = [handler]  # diffusers' library logger does not propagate: nothing else prints it
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():  # peft's note on stacking a second adapter, which is what we mean to do
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            yield records
    finally:
        logger.handlers = saved[0]
        logger.setLevel(saved[1])


def family_mismatch(lora, shapes, base, pipe):
    """A LoRA made for another kind of denoiser (a UNet LoRA on SD 3, an SD 3 LoRA on SDXL), named in one line
    before diffusers loads nothing or fails deep inside: which family's names its keys carry, against the base's."""
    from dreambooth.families import FAMILIES, family_of_pipeline, with_article
    have = family_of_pipeline(pipe)
    made = [f for f in FAMILIES if f.made_lora(shapes)]
    if not made or have in made:
        return None
    kinds = " or ".join(f.name for f in made)
    return (f"--lora {lora} was trained for {with_article(kinds)} base ({made[0].denoiser_name} LoRA); --base {base} is "
            f"{have.name}; give --base the model it was trained on")


def width_mismatch(lora, shapes, base, pipe):
    """'trained for another base' in the words users know: the cross-attention width (the text encoder's
    output size) that an attn2.to_k down/lora_A weight reads, against the base's."""
    widths = [s[1] for k, s in shapes.items() if re.search(r"attn2[._]to_k", k)
              and any(m in k for m in ("lora_A", "lora_down", "lora.down")) and len(s) == 2]
    from dreambooth.families import family_of_pipeline
    have = getattr(pipe, family_of_pipeline(pipe).denoiser_name).config.get("cross_attention_dim")
    if have is None:  # a transformer: family_mismatch and diffusers' own error say it
        return None
    if not widths or widths[0] == have:
        return None
    need, have = (f"{w} ({FAMILIES[w]})" if w in FAMILIES else str(w) for w in (widths[0], have))
    return (f"--lora {lora} was trained for a base with cross-attention width {need}; --base {base} has {have}; "
            "give --base the model it was trained on")


def load_lora(pipe, lora, adapter_name, base):
    """Adds one LoRA as adapter_name, or fails with one line if it is unreadable, not a LoRA, or not for this base."""
    import torch
    path = lora_weight_file(lora)
    shapes = safetensors_shapes("--lora", path)
    if not any(m in k for k in shapes for m in LORA_MARKERS):
        raise UsageError(f"--lora {path}: not a LoRA file (no lora_A/lora_down/... keys)")
    mismatch = family_mismatch(lora, shapes, base, pipe)
    if mismatch:
        raise UsageError(mismatch)
    if any(k.endswith(".dora_scale") for k in shapes):  # diffusers' kohya loader filters them out, with a warning
        print(f"infer.py: warning: --lora {path} is a DoRA LoRA in the kohya layout, whose magnitudes diffusers "
              "ignores; give the folder's pytorch_lora_weights.safetensors for the exact weights", file=sys.stderr)
    from dreambooth.families import family_of_pipeline
    family = family_of_pipeline(pipe)
    source = {"pretrained_model_name_or_path_or_dict": os.path.dirname(os.path.abspath(path)),
              "weight_name": os.path.basename(path)}
    if any(k.endswith(".lora_down.weight") for k in shapes):
        from safetensors.torch import load_file  # a UI file the family's loader does not read as it is (SD 3,
        converted = family.diffusers_state_from_ui(load_file(path))  # Flux: alpha folded in)
        if converted is not None:
            source = {"pretrained_model_name_or_path_or_dict": converted}
    with diffusers_log() as log:
        try:
            pipe.load_lora_weights(**source, adapter_name=adapter_name)
        except (ValueError, RuntimeError, KeyError, OSError) as e:  # size mismatch, unknown layers, bad layout
            size = re.search(r"size mismatch for (\S+): copying a param with shape torch.Size\((\[.*?\])\) from "
                             r"checkpoint, the shape in current model is torch.Size\((\[.*?\])\)", str(e))
            detail = (f"layer {size[1]} is {size[2]} in the LoRA, {size[3]} in the base" if size
                      else first_line(e))
            raise UsageError(width_mismatch(lora, shapes, base, pipe)
                             or f"--lora {lora} does not fit --base {base} ({detail}); give --base the model "
                             "it was trained on") from e
    # diffusers loads a LoRA whose layers the base lacks without raising: nothing created, or keys left over
    layers = sum(1 for c in pipe.components.values() if isinstance(c, torch.nn.Module) for m in c.modules()
                 if adapter_name in (getattr(m, "lora_A", None) or {}))
    unmatched = [k for r in log if "unexpected keys" in r or "missing keys" in r
                 for k in re.findall(r"[\w.]+\.lora_[\w.]*\w", r)]
    if not layers:
        raise UsageError(f"--lora {lora}: none of its layers exists in --base {base}, so it would change nothing; "
                         "it was made for another kind of model")
    if unmatched:
        raise UsageError(f"--lora {lora}: {len(unmatched)} of its weights fit no layer of --base {base} (e.g. "
                         f"{unmatched[0]}); it was made for another kind of model")


def load_embeddings(pipe, lora):
    """A pivotal-tuning run's new tokens (its *_emb.safetensors, in the --lora folder or beside the --lora file),
    loaded into the pipeline's tokenizers and text encoders; returns the word -> tokens map ({} when none)."""
    from dreambooth import pivotal
    if os.path.isdir(lora):
        path = pivotal.find_embedding_file(lora)
    else:
        path = os.path.splitext(lora)[0] + EMB_SUFFIX
        path = path if os.path.isfile(path) else None
    if path is None:
        return {}
    safetensors_shapes("--lora", path)  # a truncated file is named, not a traceback
    try:
        return pivotal.load_into_pipeline(pipe, path)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"--lora {lora}: its embeddings {os.path.basename(path)} do not fit --base ({first_line(e)}); "
                         "give --base the model it was trained on") from e


def main(argv=None):
    return run_cli("infer.py", _main, argv)


def _main(argv):
    args = build_parser().parse_args(argv)
    check(args)

    from dreambooth.quiet import quiet_libraries
    quiet_libraries()  # first: some notices are printed at import time
    import diffusers
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
    names, token_map = [], {}
    for i, lora in enumerate(args.lora):
        names.append(f"lora{i}")
        load_lora(pipe, lora, names[-1], args.base)
        token_map.update(load_embeddings(pipe, lora))
    if token_map:
        words = ", ".join(f"{w} -> {''.join(t)}" for w, t in token_map.items())
        print(f"infer.py: new tokens loaded: {words}", file=sys.stderr)
    from dreambooth.pivotal import rewrite  # pivotal tuning: TOK -> <s0><s1>, as the run's prompts were
    if names:
        pipe.set_adapters(names, adapter_weights=args.lora_scale or [1.0] * len(names))
    for note in trigger_notes(args.lora, args.prompt):
        print(note, file=sys.stderr)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    files = {}  # generated in full before anything is written: a failure or Ctrl-C leaves no partial output
    for p, prompt in enumerate(args.prompt):
        generators = [torch.Generator("cpu").manual_seed(args.seed + k) for k in range(args.num_images)]
        batch = pipe(rewrite(prompt, token_map), negative_prompt=args.negative_prompt, num_images_per_prompt=args.num_images,
                     num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                     height=args.height, width=args.width).images
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
