"""LoRA on the loaded base model: which layers get it, checked before anything is generated or written.

Loading the model and everything that differs between model families lives in dreambooth/families/.
"""
from dataclasses import dataclass

from .errors import UsageError

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]  # CLIP's attention
TARGETS_DEFAULT_SD = "to_q,to_k,to_v,to_out.0"


@dataclass
class LoraSettings:
    """The flags that shape the LoRA: what add_lora needs, and nothing else of the run."""
    rank: int = 4
    lora_alpha: float = None
    lora_dropout: float = 0.0
    use_dora: bool = False
    lora_target_modules: str = TARGETS_DEFAULT_SD
    train_text_encoder: bool = False

    @classmethod
    def from_flags(cls, lora):
        """From the LoRA flags' names (run_config.LoraConfig)."""
        return cls(lora.rank, lora.lora_alpha, lora.lora_dropout, lora.use_dora, lora.lora_target_modules,
                   lora.train_text_encoder)


def lora_config(settings, target_modules):
    from peft import LoraConfig
    return LoraConfig(r=settings.rank, lora_alpha=settings.lora_alpha or settings.rank,
                      lora_dropout=settings.lora_dropout, init_lora_weights="gaussian", target_modules=target_modules,
                      use_dora=settings.use_dora)


def check_lora_targets(denoiser, target_modules, default=TARGETS_DEFAULT_SD, flag="--lora_target_modules"):
    """Names in --lora_target_modules (--lora_layers) must exist in this denoiser and be layers peft can wrap (it
    matches a name against the end of each module path, as here): checked right after loading, before any class
    image is generated or any output is written."""
    import torch
    wrappable = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    modules = list(denoiser.named_modules())
    kind = type(denoiser).__name__
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]
    for target in targets:
        matched = [m for n, m in modules if n == target or n.endswith("." + target)]
        if not matched:
            raise UsageError(f"{flag}: no {kind} module named {target}; the default for this model is {default}")
        if not any(isinstance(m, wrappable) for m in matched):
            children = sorted({n.split(".")[-1] for n, m in modules if isinstance(m, wrappable)
                               and (n.rsplit(".", 1)[0] == target or n.rsplit(".", 1)[0].endswith("." + target))})
            inside = f": {', '.join(f'{target}.{c}' for c in children)}" if children else ""
            raise UsageError(f"{flag}: {target} is of type {type(matched[0]).__name__}, and LoRA wraps "
                             f"only Linear, Conv and Embedding layers; name the layers inside it instead{inside}")
    return targets


def check_resolution(multiple, resolution, bucket_steps=None):
    """--resolution (and bucket sides) the loaded model can take: a multiple of `multiple` (the VAE's scale
    factor times the UNet's downsampling), checked as soon as it is known."""
    if resolution % multiple:
        hint = " (512 for SD 1.5, 768 for SD 2.1, 1024 for SDXL)" if multiple == 64 else ""
        raise UsageError(f"--resolution {resolution} is not a multiple of {multiple}, the smallest size step this "
                         f"model takes; use {max(multiple, resolution // multiple * multiple)} or "
                         f"{(resolution // multiple + 1) * multiple}{hint}")
    if bucket_steps is not None and bucket_steps % multiple:
        raise UsageError(f"--bucket_reso_steps {bucket_steps} is not a multiple of {multiple}, the smallest size "
                         "step this model takes")


def add_lora(denoiser, text_encoders, settings, text_encoder_targets=None):
    """LoRA on the denoiser (and, when asked, on the text encoders the family names targets for: CLIP's attention
    by default; SD 3's and Flux's T5 has none, it stays frozen as in diffusers' scripts); trainable parameters kept
    in fp32 so fp16 mixed precision never tries to unscale fp16 gradients."""
    import torch
    from diffusers.training_utils import cast_training_params
    denoiser.add_adapter(lora_config(settings, check_lora_targets(denoiser, settings.lora_target_modules)))
    trained = [denoiser]
    if settings.train_text_encoder:
        targets = text_encoder_targets or [TEXT_ENCODER_TARGETS] * len(text_encoders)
        for encoder, names in zip(text_encoders, targets):
            if names:
                encoder.add_adapter(lora_config(settings, list(names)))
                trained.append(encoder)
    cast_training_params(trained, dtype=torch.float32)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]
