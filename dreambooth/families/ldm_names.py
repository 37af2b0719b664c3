"""diffusers UNet module paths -> the original (LDM/SGM) ones, as single-file checkpoints and kohya's SDXL LoRA
files name them (`down_blocks.1.attentions.0` -> `input_blocks.4.1`). Stdlib only."""

RESNET = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
          ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]
UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
            "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
            "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL


def rename(rest, pairs):
    """Replace the leading module name of `rest` (itself, or followed by '.') by its original-layout name."""
    for new, old in pairs:
        if rest == new or rest.startswith(new + "."):
            return old + rest[len(new):]
    return rest


def _join(*parts):
    return ".".join(p for p in parts if p)


def unet_module_to_ldm(path, layers_per_block, up_block_types):
    """One module (or parameter) path of a diffusers UNet in the original layout. `up_block_types` tells where the
    upsampler sits (after the attention of a cross-attention level, else after the resnet)."""
    for new, old in UNET_TOP.items():
        if path == new or path.startswith(new + "."):
            return old + path[len(new):]
    parts = path.split(".")
    per = layers_per_block + 1
    if parts[0] in ("down_blocks", "up_blocks"):
        i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
        if parts[0] == "down_blocks":
            if kind == "resnets":
                return _join(f"input_blocks.{i * per + j + 1}.0", rename(rest, RESNET))
            if kind == "attentions":
                return _join(f"input_blocks.{i * per + j + 1}.1", rest)
            return _join(f"input_blocks.{(i + 1) * per}.0.op", rest.split(".", 1)[1] if "." in rest else "")  # conv -> op
        if kind == "resnets":
            return _join(f"output_blocks.{i * per + j}.0", rename(rest, RESNET))
        if kind == "attentions":
            return _join(f"output_blocks.{i * per + j}.1", rest)
        has_attention = "CrossAttn" in up_block_types[i]
        return _join(f"output_blocks.{i * per + per - 1}.{2 if has_attention else 1}", rest)  # keeps its .conv
    if parts[0] == "mid_block":
        kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        return _join(f"middle_block.{2 * j}", rename(rest, RESNET)) if kind == "resnets" else \
            _join("middle_block.1", rest)
    raise KeyError(f"unexpected UNet module {path}")
