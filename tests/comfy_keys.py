"""What ComfyUI's LoRA loader does with a file, emulated offline: its key map (comfy.lora.model_lora_keys_unet /
model_lora_keys_clip: which names it accepts for which weight) and load_lora's suffix search (lora_up/lora_down,
lora_B/lora_A, .lora.up/.lora.down, .alpha, .dora_scale), so a test can say "ComfyUI consumes every key" and
compute the weights ComfyUI patches. The names are ComfyUI's; the map is built from the diffusers model itself
(module paths -> the key names ComfyUI derives for them), so it needs no ComfyUI checkpoint."""
import torch

CLIP_MODULES = ("mlp.fc1", "mlp.fc2", "self_attn.k_proj", "self_attn.q_proj", "self_attn.v_proj", "self_attn.out_proj")
# comfy.utils.mmdit_to_diffusers: the SD 3 transformer modules ComfyUI maps onto its own (fused qkv) weights
MMDIT_BLOCK = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
               "attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2", "norm1.linear", "norm1_context.linear")
MMDIT_BASIC = ("context_embedder", "time_text_embed.timestep_embedder.linear_1",
               "time_text_embed.timestep_embedder.linear_2", "pos_embed.proj", "time_text_embed.text_embedder.linear_1",
               "time_text_embed.text_embedder.linear_2", "norm_out.linear", "proj_out")
# comfy.utils.flux_to_diffusers: the Flux transformer modules ComfyUI maps
FLUX_DOUBLE = MMDIT_BLOCK
FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "norm.linear", "proj_out")
FLUX_BASIC = ("proj_out", "x_embedder", "time_text_embed.timestep_embedder.linear_1",
              "time_text_embed.timestep_embedder.linear_2", "context_embedder", "time_text_embed.text_embedder.linear_1",
              "time_text_embed.text_embedder.linear_2", "time_text_embed.guidance_embedder.linear_1",
              "time_text_embed.guidance_embedder.linear_2", "norm_out.linear")


def _weighted_modules(model):
    return [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def key_map(family):
    """{name ComfyUI accepts in a LoRA file (before the suffix): (part, diffusers module path)} for the family's
    denoiser and text encoders."""
    from dreambooth.families.ldm_names import unet_module_to_ldm
    out = {}
    denoiser = family.denoiser
    if family.denoiser_name == "unet":
        config = denoiser.config
        for path in _weighted_modules(denoiser):  # diffusers names (SD 1.x kohya files) and LDM names (SDXL ones)
            out["lora_unet_" + path.replace(".", "_")] = ("denoiser", path)
            ldm = unet_module_to_ldm(path, config.layers_per_block, config.up_block_types)
            out["lora_unet_" + ldm.replace(".", "_")] = ("denoiser", path)
    else:
        flux = hasattr(denoiser, "single_transformer_blocks")
        paths = set(_weighted_modules(denoiser))
        if flux:
            allowed = {f"transformer_blocks.{i}.{m}" for i in range(len(denoiser.transformer_blocks)) for m in FLUX_DOUBLE}
            allowed |= {f"single_transformer_blocks.{i}.{m}" for i in range(len(denoiser.single_transformer_blocks))
                        for m in FLUX_SINGLE}
            allowed |= set(FLUX_BASIC)
        else:
            allowed = {f"transformer_blocks.{i}.{m}" for i in range(len(denoiser.transformer_blocks)) for m in MMDIT_BLOCK}
            allowed |= set(MMDIT_BASIC)
        for path in paths & allowed:
            out["transformer." + path] = ("denoiser", path)
            out["lora_transformer_" + path.replace(".", "_")] = ("denoiser", path)
    # text encoders: CLIP layers under the kohya prefixes and diffusers' text_encoder(_2).text_model... names
    clip_prefixes = {"SD 1.x/2.x": [("lora_te_", "text_encoder")], "SDXL": [("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")],
                     "SD 3": [("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2")],
                     "Flux.1": [("lora_te1_", "text_encoder")]}[family.name]
    for prefix, name in clip_prefixes:
        part = f"text_encoder:{family.text_encoder_names.index(name)}"
        for b in range(32):
            for c in CLIP_MODULES:
                path = f"text_model.encoder.layers.{b}.{c}"
                out[f"{prefix}text_model_encoder_layers_{b}_{c.replace('.', '_')}"] = (part, path)
                out[f"{name}.{path}"] = (part, path)
    return out


SUFFIXES = ((".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
            (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"))


def load_lora(state, keys):
    """(patches {(part, module path): (up, down, scale)}, keys of the file ComfyUI leaves unloaded): load_lora's
    search, first suffix pair that is present wins; the scale is alpha / rank with an .alpha key, else 1."""
    consumed, patches = set(), {}
    for name, target in keys.items():
        for up_suffix, down_suffix in SUFFIXES:
            up, down = name + up_suffix, name + down_suffix
            if up in state and down in state:
                alpha_key = name + ".alpha"
                scale = float(state[alpha_key]) / state[down].shape[0] if alpha_key in state else 1.0
                consumed |= {up, down} | ({alpha_key} if alpha_key in state else set())
                if name + ".dora_scale" in state:
                    consumed.add(name + ".dora_scale")
                patches[target] = (state[up], state[down], scale)
                break
    return patches, sorted(set(state) - consumed)


def delta(patch):
    """The weight change ComfyUI applies for one patch (strength 1)."""
    up, down, scale = patch
    return scale * (up.flatten(1).float() @ down.flatten(1).float())
