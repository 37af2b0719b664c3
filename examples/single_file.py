"""Write a diffusers SD pipeline as ONE original-layout checkpoint (the .safetensors files people
download for A1111/ComfyUI): model.diffusion_model.*, first_stage_model.*, cond_stage_model.transformer.*.
An SDXL pipeline (one with text_encoder_2) is written in SGM's layout instead: the UNet's added-conditioning
MLP as label_emb.0.*, text_encoder as conditioner.embedders.0.transformer.text_model.* (HF CLIP names) and
text_encoder_2 as conditioner.embedders.1.model.* (OpenCLIP names, q/k/v fused into in_proj).

Only needed to test single-file loading offline; it inverts the key mapping that diffusers'
`from_single_file` applies, for any layers_per_block and number of blocks.
"""
import os
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from dreambooth.families.ldm_names import unet_module_to_ldm  # noqa: E402  (the one mapping, shared with kohya SDXL names)

VAE_RESNET = [("conv_shortcut", "nin_shortcut")]
VAE_ATTENTION = [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out")]


def _rename(rest, pairs):
    for new, old in pairs:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def unet_to_original(state, config):
    return {unet_module_to_ldm(key, config["layers_per_block"], config["up_block_types"]): value
            for key, value in state.items()}


def vae_to_original(state, config):
    n = len(config["up_block_types"])
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out")
        parts = new.split(".")
        if parts[1] in ("down_blocks", "up_blocks"):
            coder, i, kind, rest = parts[0], int(parts[2]), parts[3], ".".join(parts[4:])
            block = i if coder == "encoder" else n - 1 - i
            stage = "down" if coder == "encoder" else "up"
            if kind == "resnets":
                j, rest = rest.split(".", 1)
                new = f"{coder}.{stage}.{block}.block.{j}.{_rename(rest, VAE_RESNET)}"
            else:  # downsamplers/upsamplers .0.conv
                new = f"{coder}.{stage}.{block}.{'downsample' if coder == 'encoder' else 'upsample'}.{rest.split('.', 1)[1]}"
        elif parts[1] == "mid_block":
            coder, kind, j, rest = parts[0], parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"{coder}.mid.block_{j + 1}.{_rename(rest, VAE_RESNET)}"
            else:
                new = f"{coder}.mid.attn_1.{_rename(rest, VAE_ATTENTION)}"
                if value.ndim == 2:
                    value = value[:, :, None, None]  # LDM attention uses 1x1 convs
        out[new] = value
    return out


OPEN_CLIP_LAYER = [("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj"),
                   ("self_attn.out_proj", "attn.out_proj")]


def clip_with_projection_to_open_clip(state):
    """CLIPTextModelWithProjection -> OpenCLIP text tower names (the inverse of diffusers' convert_open_clip_checkpoint)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    out = {"positional_embedding": state.pop("embeddings.position_embedding.weight"),
           "token_embedding.weight": state.pop("embeddings.token_embedding.weight"),
           "ln_final.weight": state.pop("final_layer_norm.weight"), "ln_final.bias": state.pop("final_layer_norm.bias"),
           "text_projection": state.pop("text_projection.weight").T}  # OpenCLIP multiplies x @ text_projection
    for key in [k for k in state if ".self_attn.q_proj." in k]:
        layer, kind = key.split(".")[2], key.rsplit(".", 1)[1]
        base = f"encoder.layers.{layer}.self_attn."
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat(
            [state.pop(base + f"{p}_proj.{kind}") for p in "qkv"])
    for key, value in state.items():
        parts = key.split(".")  # encoder.layers.N.rest
        if parts[:2] != ["encoder", "layers"]:
            raise KeyError(f"unexpected text encoder key {key}")
        out[f"transformer.resblocks.{parts[2]}.{_rename('.'.join(parts[3:]), OPEN_CLIP_LAYER)}"] = value
    return out


def write_original_layout_checkpoint(pipe, path):
    state = {}
    for k, v in unet_to_original(pipe.unet.state_dict(), pipe.unet.config).items():
        state["model.diffusion_model." + k] = v
    for k, v in vae_to_original(pipe.vae.state_dict(), pipe.vae.config).items():
        state["first_stage_model." + k] = v
    sdxl = getattr(pipe, "text_encoder_2", None) is not None
    for k, v in pipe.text_encoder.state_dict().items():
        k = k if k.startswith("text_model.") else "text_model." + k
        state[("conditioner.embedders.0.transformer." if sdxl else "cond_stage_model.transformer.") + k] = v
    if sdxl:
        for k, v in clip_with_projection_to_open_clip(pipe.text_encoder_2.state_dict()).items():
            state["conditioner.embedders.1.model." + k] = v
    save_file({k: v.contiguous().to(torch.float32) for k, v in state.items()}, path)
