"""Model families: what differs between SD 1.x/2.x, SDXL and SD 3 lives behind one seam (base.ModelFamily).

A family loads its components (hub id, diffusers folder or single file), tokenizes and encodes prompts, owns the
training objective (how examples are noised, what the denoiser predicts, how each counts: DDPM for the UNets,
flow matching for the transformers) and the denoiser call (pooled embeddings, time ids, packing and ids stay in
here: the training loop passes them through untouched, as kohya's `get_noise_pred_and_target` does), makes the
sampling pipeline used for class priors, validation, infer.py and evaluate.py, names LoRA weights in the diffusers
and UI layouts, states the facts the file headers and the model card need, and declares the flags it takes. The
family is detected from the model itself; there is no flag.

Adding a family is one module here (a subclass of unet.UNetFamily or flow.FlowFamily with its names, `encode`,
`conditioning` and `denoise`), its place in FAMILIES, its tiny builder in examples/make_tiny_model.py and its row
in tests/test_family_contract.py.
"""
import json
import os

from ..errors import UsageError
from ..files import sniff_weights_file
from .base import ModelFamily, ModelSource, PromptEncoder, load_error  # noqa: F401 (the seam's public names)
from .sd import StableDiffusion
from .flux import Flux
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

FAMILIES = (StableDiffusionXL, StableDiffusion, StableDiffusion3, Flux)
__all__ = ["FAMILIES", "Flux", "ModelFamily", "ModelSource", "PromptEncoder", "StableDiffusion", "StableDiffusion3",
           "StableDiffusionXL", "add_family_flags", "detect", "family_of_pipeline", "load_error",
           "resolve_family_flags"]

# Single-file checkpoints: the families' own tensor names (original layouts, with or without ComfyUI's prefix)
_SINGLE_FILE_MARKERS = ((StableDiffusion3, ("joint_blocks.0.", "model.diffusion_model.joint_blocks.")),
                        (Flux, ("double_blocks.0.", "model.diffusion_model.double_blocks.")),
                        (StableDiffusionXL, ("conditioner.embedders.1.",)))


def _single_file_keys(path):
    """Tensor names of a .safetensors (from its header: no weights read) or .ckpt (memory-mapped) file."""
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, "pt") as f:  # reads and checks the header only
            return list(f.keys())
    import torch
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
        state = torch.load(path, map_location="cpu", weights_only=True)
    return list(state.get("state_dict", state))


def _read_json(path, model, flag):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:  # missing, unreadable or cut short
        raise UsageError(load_error(model, os.path.relpath(path, model), e, flag)) from e


def _pipeline_class_name(source, flag):
    path = source.path
    if os.path.isdir(path):
        index = os.path.join(path, "model_index.json")
        if os.path.isfile(index):
            return _read_json(index, path, flag).get("_class_name", "")
        if os.path.isfile(os.path.join(path, "transformer", "config.json")):  # a folder of parts
            transformer = _read_json(os.path.join(path, "transformer", "config.json"), path, flag)
            by_denoiser = {f.denoiser_class: f.pipeline_class_name for f in FAMILIES}
            return by_denoiser.get(transformer.get("_class_name"), transformer.get("_class_name"))
        unet = _read_json(os.path.join(path, "unet", "config.json"), path, flag)
        text_time = unet.get("addition_embed_type") == "text_time"
        return StableDiffusionXL.pipeline_class_name if text_time else StableDiffusion.pipeline_class_name
    if os.path.isfile(path):
        problem = sniff_weights_file(path)
        if problem:
            raise UsageError(f"{flag} {path} {problem}; download or convert it again")
        try:
            keys = _single_file_keys(path)
        except Exception:  # an old pickle torch will not load safely: SD, as nearly every .ckpt is; the loader
            keys = []      # then says what is wrong with it
        for family, markers in _SINGLE_FILE_MARKERS:
            if any(k.startswith(markers) for k in keys):
                return family.pipeline_class_name
        return StableDiffusion.pipeline_class_name
    from ..quiet import quiet_libraries
    quiet_libraries()  # before diffusers is imported: it prints notices at import
    from diffusers import DiffusionPipeline
    from .base import hub_unreachable, loaded
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    problem = None if offline else hub_unreachable()
    if problem and not _cached(path, source):
        raise UsageError(f"{flag} {path}: cannot reach the Hugging Face Hub to download it ({problem}); check the "
                         "network, or point the flag at a local folder")
    config = loaded(path, "model_index.json", DiffusionPipeline.load_config, path, revision=source.revision,
                    cache_dir=source.cache_dir, flag=flag)
    return config.get("_class_name", "")


def _cached(path, source):
    """True when the model's model_index.json is in the local Hugging Face cache (usable without the network)."""
    from huggingface_hub import try_to_load_from_cache
    found = try_to_load_from_cache(path, "model_index.json", cache_dir=source.cache_dir, revision=source.revision)
    return isinstance(found, str)


def detect(source, flag="--pretrained_model_name_or_path"):
    """The family class of a model, from its model_index.json, its UNet config or a single file's keys."""
    name = _pipeline_class_name(source, flag)
    for family in FAMILIES:
        if name in family.pipeline_class_names:
            return family
    raise UsageError(f"{flag} {source.path} is a {name or 'model of unknown kind'}; this trainer takes "
                     f"{', '.join(f.name for f in sorted(FAMILIES, key=lambda f: f.name))} base pipelines")


def with_article(name):
    """'an SD 3', 'an SDXL', 'a Flux.1': the family names read as letters take 'an'."""
    return ("an " if name.startswith(("SD", "A", "E", "I", "O", "U")) else "a ") + name


def family_of_pipeline(pipe):
    """The family of a loaded diffusers pipeline, by its class (never by which attributes it has)."""
    for family in FAMILIES:
        if type(pipe).__name__ in family.pipeline_class_names:
            return family
    raise UsageError(f"{type(pipe).__name__} is not a pipeline this trainer knows "
                     f"({', '.join(f.pipeline_class_name for f in FAMILIES)})")


def add_family_flags(parser):
    """The flags some families add (declared in their modules), once each, in one group of --help."""
    group = parser.add_argument_group("model-family flags (SD 3 / Flux, as diffusers' scripts; refused with one line "
                                      "on a model that does not take them)")
    added = set()
    for family in FAMILIES:
        for flag, spec in getattr(family, "flag_specs", {}).items():
            if flag not in added:
                group.add_argument(f"--{flag}", default=None, **spec)
                added.add(flag)


def _t5_positions(args, family):
    """The T5 tokenizer's model_max_length in a local model folder, or None (no T5, a hub id, a single file)."""
    index = family.text_encoder_names.index(family.t5_name) if getattr(family, "t5_name", None) else None
    if index is None:
        return None
    path = os.path.join(str(args.pretrained_model_name_or_path), family.tokenizer_names[index], "tokenizer_config.json")
    if not os.path.isfile(path):
        return None
    value = _read_json(path, args.pretrained_model_name_or_path, "--pretrained_model_name_or_path").get("model_max_length")
    return value if isinstance(value, int) and value < 10**6 else None  # transformers writes 1e30 for "no limit"


def resolve_family_flags(args, family):
    """Flags of other families refused with one line; this family's defaults filled in where the flag was not
    given; --lora_layers (the SD 3 / Flux scripts' name) becomes --lora_target_modules, whose default is the
    family's."""
    ours = set(family.flags)
    for flag in sorted({f for other in FAMILIES for f in other.flags} - ours):
        value = getattr(args, flag, None)
        if value is not None and value is not False:  # 0 is a value given (0 == False in Python)
            takers = " / ".join(f.name for f in FAMILIES if flag in f.flags)
            raise UsageError(f"--{flag} is {with_article(takers)} flag; --pretrained_model_name_or_path "
                             f"{args.pretrained_model_name_or_path} is {family.name}: drop it")
    for flag, default in family.defaults(args).items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)
    if getattr(args, "lora_layers", None):
        if args.lora_target_modules and args.lora_target_modules != args.lora_layers:
            raise UsageError("--lora_layers and --lora_target_modules name the same thing; give one of them")
        args.lora_target_modules, args.lora_layers, args._lora_targets_flag = args.lora_layers, None, "--lora_layers"
    if args.lora_target_modules is None:
        args.lora_target_modules = family.default_lora_targets
    model = str(args.pretrained_model_name_or_path)
    missing = family.missing_part(model) if os.path.isdir(model) else None
    if missing:
        index = family.text_encoder_names.index(missing) if missing in family.text_encoder_names else None
        what = f" ({family.text_encoder_classes[index]})" if index is not None else ""
        raise UsageError(f"--pretrained_model_name_or_path {model}: its {missing}/ folder{what} is missing, which "
                         f"{family.name} needs; download the whole model again")
    if hasattr(family, "check_flags"):
        family.check_flags(args, _t5_positions(args, family))
