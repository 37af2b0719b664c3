"""Loading a LoRA onto a loaded pipeline, for infer.py, evaluate.py and the examples alike: every way a user's
LoRA can fail (unreadable, not a LoRA, made for another base, NaN weights, its pivotal-tuning embeddings missing)
as one line naming it, and diffusers' and peft's paragraphs about it kept off the terminal. One home, so a LoRA
that infer.py refuses in one line is refused in the same line everywhere it is loaded."""
import contextlib
import os
import re
import sys

from . import pivotal
from .errors import UsageError, first_line
from .pivotal import EMB_SUFFIX

LORA_MARKERS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")
# the text-conditioning width a UNet's cross-attention reads tells the UNet families apart
WIDTH_FAMILIES = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
BUNDLE_PREFIX = "bundle_emb."  # kohya's embeddings inside a LoRA file (A1111 reads them)


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


def check_lora_file(lora, flag="--lora"):
    """A --lora file that is no LoRA the loaders read, refused before any model loads: a pivotal run's embeddings
    file given instead of its LoRA, or a pickle (.bin/.pt/.ckpt), which this project never unpickles."""
    if not os.path.isfile(lora):
        return
    if pivotal.is_embeddings_file(lora):
        raise UsageError(f"{flag} {lora} is the new tokens' embeddings file of a pivotal-tuning run, not a LoRA; "
                         "give the run's folder or its LoRA file, which bring this file with them")
    if not lora.endswith(".safetensors"):
        raise UsageError(f"{flag} {lora}: not a .safetensors file; LoRAs are read only as .safetensors (a .bin, .pt "
                         "or .ckpt pickle can run code when loaded): give the .safetensors version")


def lora_weight_file(path):
    """A folder may hold our diffusers file, a kohya file, or both: prefer the diffusers one."""
    if not os.path.isdir(path):
        return path
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors") and not n.endswith(EMB_SUFFIX))
    return os.path.join(path, "pytorch_lora_weights.safetensors" if "pytorch_lora_weights.safetensors" in names
                        else names[0])


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
            # peft's paragraph when the LoRA's config names layers its weights lack (a LoRA for another base):
            # load_lora says that in one line of its own
            warnings.filterwarnings("ignore", message=".*inconsistency was discovered between the PEFT config.*")
            yield records
    finally:
        logger.handlers = saved[0]
        logger.setLevel(saved[1])


def family_mismatch(lora, shapes, base, pipe):
    """A LoRA made for another kind of denoiser (a UNet LoRA on SD 3, an SD 3 LoRA on SDXL), named in one line
    before diffusers loads nothing or fails deep inside: which family's names its keys carry, against the base's."""
    from .families import FAMILIES, family_of_pipeline, with_article
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
    from .families import family_of_pipeline
    have = getattr(pipe, family_of_pipeline(pipe).denoiser_name).config.get("cross_attention_dim")
    if have is None:  # a transformer: family_mismatch and diffusers' own error say it
        return None
    if not widths or widths[0] == have:
        return None
    need, have = (f"{w} ({WIDTH_FAMILIES[w]})" if w in WIDTH_FAMILIES else str(w) for w in (widths[0], have))
    return (f"--lora {lora} was trained for a base with cross-attention width {need}; --base {base} has {have}; "
            "give --base the model it was trained on")


def load_lora(pipe, lora, adapter_name, base, prog="infer.py"):
    """Adds one LoRA as adapter_name, or fails with one line if it is unreadable, not a LoRA, or not for this base.
    Returns the word -> tokens map of the embeddings bundled in its file ({} when none): kohya's and A1111's
    `bundle_emb.<name>.*` keys, whose word in prompts is <name>; diffusers reads them as LoRA weights and fails."""
    import torch
    path = lora_weight_file(lora)
    shapes = safetensors_shapes("--lora", path)
    if not any(m in k for k in shapes for m in LORA_MARKERS):
        raise UsageError(f"--lora {path}: not a LoRA file (no lora_A/lora_down/... keys)")
    mismatch = family_mismatch(lora, shapes, base, pipe)
    if mismatch:
        raise UsageError(mismatch)
    if any(k.endswith(".dora_scale") for k in shapes):  # diffusers' kohya loader filters them out, with a warning
        print(f"{prog}: warning: --lora {path} is a DoRA LoRA in the kohya layout, whose magnitudes diffusers "
              "ignores; give the folder's pytorch_lora_weights.safetensors for the exact weights", file=sys.stderr)
    from .families import family_of_pipeline
    family = family_of_pipeline(pipe)
    source = {"pretrained_model_name_or_path_or_dict": os.path.dirname(os.path.abspath(path)),
              "weight_name": os.path.basename(path)}
    bundled = {}
    if any(k.endswith(".lora_down.weight") or k.startswith(BUNDLE_PREFIX) for k in shapes):
        from safetensors.torch import load_file  # a UI file the family's loader does not read as it is (SD 3,
        state = load_file(path)                  # Flux: alpha folded in; bundled embeddings taken out)
        bundled = {k: state.pop(k) for k in list(state) if k.startswith(BUNDLE_PREFIX)}
        converted = family.diffusers_state_from_ui(state)
        if converted is not None or bundled:
            source = {"pretrained_model_name_or_path_or_dict": converted if converted is not None else state}
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
    broken = [name for c in pipe.components.values() if isinstance(c, torch.nn.Module)
              for name, param in c.named_parameters() if adapter_name in name.split(".")
              and not torch.isfinite(param).all()]
    if broken:  # a run that diverged saves NaN: every image would be black
        raise UsageError(f"--lora {lora}: {len(broken)} of its weights hold NaN or infinite numbers (its training "
                         "diverged); use an earlier checkpoint-N of the run, or retrain with a lower learning rate")
    return load_bundled(pipe, lora, bundled, family) if bundled else {}


def load_bundled(pipe, lora, bundled, family):
    """A LoRA file's bundled embeddings ({bundle_emb.<name>.<key>: rows}) into the pipeline: <name> is the word
    prompts use (A1111's convention), its rows become new tokens as our own embeddings files' do. The keys are
    the family's own (emb_params, clip_l, clip_g) or A1111's string_to_param.* for a one-encoder model."""
    mapping, states = {}, {}
    for key, rows in bundled.items():
        _, name, part = key.split(".", 2)
        part = family.embedding_file_keys[0] if part.startswith("string_to_param") else part
        if part not in family.embedding_file_keys:
            raise UsageError(f"--lora {lora}: its bundled embedding {name} has rows for {part}, which {family.name} "
                             f"has no text encoder for ({', '.join(family.embedding_file_keys)}); give --base the "
                             "model it was trained on")
        states.setdefault(name, {})[part] = rows.reshape(-1, rows.shape[-1])
    for name, state in states.items():
        count = next(iter(state.values())).shape[0]
        try:
            mapping.update(pivotal.load_state_into_pipeline(pipe, {name: [f"<{name}_{i}>" for i in range(count)]},
                                                            state))
        except (ValueError, KeyError, RuntimeError) as e:
            raise UsageError(f"--lora {lora}: its bundled embedding {name} does not fit --base ({first_line(e)}); "
                             "give --base the model it was trained on") from e
    return mapping


def load_embeddings(pipe, lora):
    """A pivotal-tuning run's new tokens (its *_emb.safetensors, in the --lora folder or beside the --lora file:
    pivotal.lora_embeddings), loaded into the pipeline's tokenizers and text encoders under names no earlier
    --lora took; returns the word -> tokens map ({} when none)."""
    path = pivotal.lora_embeddings(lora, "--lora")
    if path is None:
        return {}
    safetensors_shapes("--lora", path)  # a truncated file is named, not a traceback
    try:
        return pivotal.load_into_pipeline(pipe, path)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UsageError(f"--lora {lora}: its embeddings {os.path.basename(path)} do not fit --base ({first_line(e)}); "
                         "give --base the model it was trained on") from e
