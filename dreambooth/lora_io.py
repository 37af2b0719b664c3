"""LoRA files: the diffusers layout `load_lora_weights` reads, the kohya layout ComfyUI/A1111 read,
written atomically so a crash mid-save never leaves a file a loader chokes on."""
import datetime
import json
import os
import shutil
import tempfile

from . import __version__
from .files import atomic_write

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def _peft_state_dict(model):
    import torch
    from peft.utils import get_peft_model_state_dict
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in get_peft_model_state_dict(model).items()}


def _adapter_metadata(model):
    config = model.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def diffusers_lora_layers(unet, text_encoder=None):
    """State dicts in the layout diffusers' own training scripts save. Text-encoder keys carry the
    `text_model.` level every SD LoRA file has, even where transformers 5 flattened it away."""
    from diffusers.utils import convert_state_dict_to_diffusers
    unet_layers = convert_state_dict_to_diffusers(_peft_state_dict(unet))
    te_layers = None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        te_layers = convert_state_dict_to_diffusers(_peft_state_dict(text_encoder))
        te_layers = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in te_layers.items()}
    return unet_layers, te_layers


def save_diffusers_lora(folder, unet, text_encoder=None):
    """folder/pytorch_lora_weights.safetensors, loadable by pipe.load_lora_weights(folder)."""
    from diffusers import StableDiffusionPipeline
    unet_layers, te_layers = diffusers_lora_layers(unet, text_encoder)
    metadata = {"unet_lora_adapter_metadata": _adapter_metadata(unet)}
    if te_layers:
        metadata["text_encoder_lora_adapter_metadata"] = _adapter_metadata(text_encoder)

    def write(tmp):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(tmp)) as staging:
            StableDiffusionPipeline.save_lora_weights(staging, unet_lora_layers=unet_layers,
                                                      text_encoder_lora_layers=te_layers, **metadata)
            shutil.move(os.path.join(staging, LORA_WEIGHT_NAME), tmp)

    atomic_write(os.path.join(folder, LORA_WEIGHT_NAME), write)
    return unet_layers, te_layers


def kohya_state_dict(unet, text_encoder=None, alpha=None):
    """The layout kohya sd-scripts write and A1111/ComfyUI read: lora_unet_<module_path>.lora_down/up
    with a per-module .alpha; text-encoder modules as lora_te_text_model_encoder_layers_N_..."""
    import torch
    out = {}
    parts = [("lora_unet_", unet)] + ([("lora_te_", text_encoder)] if text_encoder is not None else [])
    for prefix, model in parts:
        config = model.peft_config["default"]
        if config.use_dora:
            raise ValueError("kohya export of DoRA weights is not supported; use --output_format diffusers")
        for key, value in _peft_state_dict(model).items():
            module, kind = key.rsplit(".lora_", 1)
            if prefix == "lora_te_" and not module.startswith("text_model."):
                module = "text_model." + module
            name = prefix + module.replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else config.lora_alpha))
    return out


def save_kohya_lora(folder, unet, text_encoder, args, steps):
    """<output_dir name>.safetensors with kohya-style ss_* metadata, for ComfyUI and A1111."""
    from safetensors.torch import save_file
    state = kohya_state_dict(unet, text_encoder)
    metadata = {
        "ss_base_model_version": "sd_v1" if "2" not in str(args.pretrained_model_name_or_path) else "sd_v2",
        "ss_sd_model_name": str(args.pretrained_model_name_or_path),
        "ss_network_module": "networks.lora", "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.lora_alpha or args.rank), "ss_resolution": str(args.resolution),
        "ss_steps": str(steps), "ss_training_comment": args.instance_prompt,
        "ss_training_finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dreambooth_lora_version": __version__, "instance_prompt": args.instance_prompt,
    }
    name = os.path.basename(os.path.normpath(os.path.abspath(folder))) or "lora"
    path = os.path.join(folder, f"{name}.safetensors")
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path
