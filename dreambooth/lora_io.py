"""LoRA files: the diffusers layout `load_lora_weights` reads, the kohya layout ComfyUI/A1111 read,
written atomically so a crash mid-save never leaves a file a loader chokes on."""
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field

from . import __version__
from .files import add_safetensors_metadata, atomic_write

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


def _peft_layers(model, prefix=""):
    """A model's LoRA under peft's own names (`<module>.lora_A.weight`, `.lora_B.weight`,
    `.lora_magnitude_vector.weight`) for every target module alike. diffusers' convert_state_dict_to_diffusers
    renames only the attention projections (`to_q.lora.down`) and leaves resnet convs, proj_in/out, feed-forward
    and time-embedding layers as lora_A: a file mixing both styles makes load_lora_weights read it as the old
    format and silently skip every attention module. One style loads whole. The magnitude vector gets its
    `.weight`, which peft's and transformers' loaders both map onto the parameter (without it, transformers 5
    drops a text encoder's DoRA magnitudes)."""
    out = {}
    for key, value in _peft_state_dict(model).items():
        if key.endswith("lora_magnitude_vector"):
            key += ".weight"
        out[prefix + key] = value
    return out


def _text_encoder_layers(text_encoder):
    """A text encoder's LoRA with the `text_model.` level every SD/SDXL LoRA file has, even where transformers 5
    flattened it away (its CLIPTextModel has no text_model attribute)."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in _peft_layers(text_encoder).items()}


def diffusers_lora_layers(family, denoiser, text_encoders=()):
    """The keyword arguments of the family's pipeline `save_lora_weights`: each trained part's LoRA
    (<denoiser>_lora_layers: unet_ or transformer_; text_encoder_lora_layers, text_encoder_2_lora_layers) in one
    key style, with the adapter metadata (rank, alpha, targets, DoRA) diffusers reads back."""
    name = family.denoiser_name
    out = {f"{name}_lora_layers": _peft_layers(denoiser), f"{name}_lora_adapter_metadata": _adapter_metadata(denoiser)}
    for name, encoder in zip(family.text_encoder_names, text_encoders):
        if getattr(encoder, "peft_config", None):
            out[f"{name}_lora_layers"] = _text_encoder_layers(encoder)
            out[f"{name}_lora_adapter_metadata"] = _adapter_metadata(encoder)
    return out


def save_diffusers_lora(folder, family, denoiser, text_encoders=(), metadata=None):
    """folder/pytorch_lora_weights.safetensors, loadable by the family's pipe.load_lora_weights(folder); `metadata`:
    more header entries (a pivotal run's: which embeddings file the LoRA needs, so the file says so on its own)."""
    layers = diffusers_lora_layers(family, denoiser, text_encoders)

    def write(tmp):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(tmp)) as staging:
            family.pipeline_class().save_lora_weights(staging, **layers)
            if metadata:
                add_safetensors_metadata(os.path.join(staging, LORA_WEIGHT_NAME), tmp, metadata)
            else:
                shutil.move(os.path.join(staging, LORA_WEIGHT_NAME), tmp)

    atomic_write(os.path.join(folder, LORA_WEIGHT_NAME), write)
    return layers


def kohya_state_dict(family, denoiser, text_encoders=(), alpha=None):
    """The layout kohya sd-scripts write and A1111/ComfyUI read: <module>.lora_down/up with a per-module .alpha,
    the denoiser's module named as the family's UI files name it (family.ui_denoiser_key: lora_unet_ + diffusers
    paths for SD 1.x/2.x, the original input_blocks/... paths for SDXL); text-encoder modules under the family's prefixes
    (lora_te_ for SD, lora_te1_/lora_te2_ for SDXL) as text_model_encoder_layers_N_...; DoRA's magnitude as
    .dora_scale in LyCORIS' output-axis layout, (out, 1) for Linear and (out, 1, 1, 1) for Conv2d: one magnitude
    per output row, normalised by the row norms of the updated weight, which is exactly peft's DoRA (ComfyUI
    tells that layout from the input-axis one by the first dimension).
    Ours, not diffusers' conversion utilities: those write alpha = rank and drop the text_model level."""
    import torch
    out = {}
    def text_name(prefix):
        return lambda m: prefix + (m if m.startswith("text_model.") else "text_model." + m).replace(".", "_")
    parts = [(denoiser, family.ui_denoiser_key)]
    parts += [(encoder, text_name(prefix)) for prefix, encoder in zip(family.kohya_text_prefixes, text_encoders)
              if getattr(encoder, "peft_config", None)]
    for model, key_of in parts:
        config = model.peft_config["default"]
        for key, value in _peft_state_dict(model).items():
            module, kind = key.rsplit(".lora_", 1)
            name = key_of(module)
            if kind.startswith("magnitude_vector"):
                base = model.get_submodule(module).get_base_layer().weight
                out[f"{name}.dora_scale"] = value.reshape(base.shape[0], *[1] * (base.dim() - 1)).contiguous()
                continue
            out[f"{name}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else config.lora_alpha))
    return out


@dataclass
class KohyaRun:
    """What the kohya file's header says about the run (kohya_metadata.training_metadata reads it)."""
    output_name: str
    base_model: str
    instance_prompt: str
    rank: int
    alpha: float
    steps: int
    max_train_steps: int
    resolution: int
    learning_rate: float
    text_encoder_lr: float = None
    train_text_encoder: bool = False
    use_dora: bool = False
    lora_dropout: float = 0.0
    optimizer: str = ""
    lr_scheduler: str = "constant"
    seed: int = None
    mixed_precision: str = "no"
    num_train_images: int = 0
    num_reg_images: int = 0
    prior_loss_weight: float = 1.0
    repeats: int = 1
    tag_frequency: dict = field(default_factory=dict)
    started_at: float = 0.0
    finished_at: float = 0.0
    session_id: int = 0
    license: str = None
    version: str = __version__
    extra: dict = field(default_factory=dict)  # more header keys (pivotal tuning's: report.training_metadata)


def save_kohya_lora(folder, name, family, denoiser, text_encoders, run):
    """folder/<name>.safetensors in the kohya layout with the header A1111/ComfyUI/Civitai read (kohya_metadata)."""
    from safetensors.torch import save_file
    from . import kohya_metadata
    state = kohya_state_dict(family, denoiser, text_encoders)
    from .redaction import scrub_values
    metadata = scrub_values(kohya_metadata.build(family.header_facts(), run, state))
    path = os.path.join(folder, f"{name}.safetensors")
    atomic_write(path, lambda tmp: save_file(state, tmp, metadata=metadata))
    return path
