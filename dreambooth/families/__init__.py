"""Model families: what differs between Stable Diffusion 1.x/2.x and SDXL lives behind one seam.

A family loads its components (hub id, diffusers folder or single file), tokenizes and encodes prompts,
turns a batch into the UNet's keyword arguments (pooled embeddings and time ids stay in here: the training
loop passes them through untouched, as kohya's `call_unet` does), makes the sampling pipeline used for class
priors, validation and infer.py, names LoRA weights in the diffusers and kohya layouts, and states the facts a
model card needs. The family is detected from the model itself; there is no flag.

Adding a family (SD 3, say) is one module here with its own `load`, `encode`, `unet_kwargs` and names, and
its place in FAMILIES.
"""
import json
import os

from ..errors import UsageError
from ..files import sniff_weights_file
from .base import ModelFamily, ModelSource, PromptEncoder, load_error  # noqa: F401 (the seam's public names)
from .sd import StableDiffusion
from .sdxl import StableDiffusionXL

FAMILIES = (StableDiffusionXL, StableDiffusion)
__all__ = ["FAMILIES", "ModelFamily", "ModelSource", "PromptEncoder", "StableDiffusion", "StableDiffusionXL", "detect",
           "load_error"]


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
        unet = _read_json(os.path.join(path, "unet", "config.json"), path, flag)  # a folder of parts
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
        xl = any(k.startswith("conditioner.embedders.1.") for k in keys)
        return StableDiffusionXL.pipeline_class_name if xl else StableDiffusion.pipeline_class_name
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
    raise UsageError(f"{flag} {source.path} is a {name or 'model of unknown kind'}; this trainer takes Stable "
                     "Diffusion 1.x/2.x and SDXL base pipelines")
