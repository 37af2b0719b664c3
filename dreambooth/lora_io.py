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
    # save_embedding_layers=False: peft would otherwise look up the base model's vocabulary (a Hub request for a
    # hub id, a notice for a folder) on every save; our LoRA never touches embeddings
    state = get_peft_model_state_dict(model, save_embedding_layers=False)
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}


def _adapter_metadata(model):
    config = model.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda o: sorted(o) if isinstance(o, set) else str(o)))


def _text_encoder_layers(text_encoder):
    """A text encoder's LoRA in diffusers' layout, with the `text_model.` level every SD/SDXL LoRA file has, even
    where transformers 5 flattened it away (its CLIPTextModel has no text_model attribute)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    layers = convert_state_dict_to_diffusers(_peft_state_dict(text_encoder))
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in layers.items()}


def diffusers_lora_layers(family, unet, text_encoders=()):
    """The keyword arguments of the family's pipeline `save_lora_weights`: each trained part's LoRA in the layout
    diffusers' own training scripts save (unet_lora_layers, text_encoder_lora_layers, text_encoder_2_lora_layers),
    with the adapter metadata diffusers reads back."""
    from diffusers.utils import convert_state_dict_to_diffusers
    out = {"unet_lora_layers": convert_state_dict_to_diffusers(_peft_state_dict(unet)),
           "unet_lora_adapter_metadata": _adapter_metadata(unet)}
    for name, encoder in zip(family.text_encoder_names, text_encoders):
        if getattr(encoder, "peft_config", None):
            out[f"{name}_lora_layers"] = _text_encoder_layers(encoder)
            out[f"{name}_lora_adapter_metadata"] = _adapter_metadata(encoder)
    return out


def save_diffusers_lora(folder, family, unet, text_encoders=()):
    """folder/pytorch_lora_weights.safetensors, loadable by the family's pipe.load_lora_weights(folder)."""
    layers = diffusers_lora_layers(family, unet, text_encoders)

    def write(tmp):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(tmp)) as staging:
            family.pipeline_class().save_lora_weights(staging, **layers)
            shutil.move(os.path.join(staging, LORA_WEIGHT_NAME), tmp)

    atomic_write(os.path.join(folder, LORA_WEIGHT_NAME), write)
    return layers


def kohya_state_dict(family, unet, text_encoders=(), alpha=None):
    """The layout kohya sd-scripts write and A1111/ComfyUI read: lora_unet_<module>.lora_down/up with a
    per-module .alpha (the UNet module named as the family's kohya files name it: diffusers paths for SD 1.x/2.x,
    the original input_blocks/... paths for SDXL); text-encoder modules under the family's prefixes
    (lora_te_ for SD, lora_te1_/lora_te2_ for SDXL) as text_model_encoder_layers_N_...
    Ours, not diffusers' conversion utilities: those write alpha = rank and drop the text_model level."""
    import torch
    out = {}
    parts = [("lora_unet_", unet, family.kohya_unet_module)]
    parts += [(prefix, encoder, lambda m: m if m.startswith("text_model.") else "text_model." + m)
              for prefix, encoder in zip(family.kohya_text_prefixes, text_encoders)
              if getattr(encoder, "peft_config", None)]
    for prefix, model, module_name in parts:
        config = model.peft_config["default"]
        if config.use_dora:
            raise ValueError("kohya export of DoRA weights is not supported; use --output_format diffusers")
        for key, value in _peft_state_dict(model).items():
            module, kind = key.rsplit(".lora_", 1)
            name = prefix + module_name(module).replace(".", "_")
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else config.lora_alpha))
    return out


def save_kohya_lora(folder, family, unet, text_encoders, args, steps, extra_metadata=None):
    """<output_dir name>.safetensors with kohya-style ss_* metadata, for ComfyUI and A1111. extra_metadata: more
    string keys (the optimizer, pivotal tuning's prompt: report.training_metadata)."""
    from safetensors.torch import save_file
    state = kohya_state_dict(family, unet, text_encoders)
    metadata = {
        "ss_base_model_version": family.base_model_version(),
        "ss_sd_model_name": str(args.pretrained_model_name_or_path),
        "ss_network_module": "networks.lora", "ss_network_dim": str(args.rank),
        "ss_network_alpha": str(args.lora_alpha or args.rank), "ss_resolution": str(args.resolution),
        "ss_steps": str(steps), "ss_training_comment": args.instance_prompt,
        "ss_training_finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "dreambooth_lora_version": __version__, "instance_prompt": args.instance_prompt,
    }
    metadata.update(extra_metadata or {})
    name = os.path.basename(os.path.normpath(os.path.abspath(folder))) or "lora"
    path = os.path.join(folder, f"{name}.safetensors")
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path
