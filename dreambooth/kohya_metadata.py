"""What ComfyUI, AUTOMATIC1111 and Civitai read from a kohya-layout LoRA file's header: kohya sd-scripts' `ss_*`
training keys, the `sshs_*` hashes A1111 files the LoRA under, and Stability's modelspec block. Stdlib only.

The keys and their formats follow what sd-scripts' train_network.py writes, because that is what the UIs were
written against: A1111 decides SD 1 / SD 2 / SDXL from `ss_base_model_version` / `ss_v2` (and hides LoRAs made for
another version), offers `ss_tag_frequency` as activation text and `ss_output_name` as the alias, and shows the
training dates only when they are unix times."""
import datetime
import hashlib
import json
import struct

MODELSPEC_VERSION = "1.0.0"


def tag_frequency(folder_name, repeats, captions):
    """sd-scripts' ss_tag_frequency: {"<repeats>_<folder>": {tag: images using it}}, a caption's tags being its
    comma-separated parts (the instance prompt is one tag for every image without a caption file)."""
    counts = {}
    for caption in captions:
        for tag in (t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return {f"{repeats}_{folder_name}": counts}


def _safetensors_bytes(tensors, metadata):
    """The exact bytes safetensors.torch.save writes (its own tensor order, alignment and header), so the hashes
    below are those of the file a user has."""
    from safetensors.torch import save
    return save(tensors, metadata=metadata)


def addnet_hashes(tensors, metadata):
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts precomputes them for A1111's additional-networks index:
    both over the file as it would be written with only the `ss_*` keys in its header (so later edits to other
    metadata do not change them). The model hash is the SHA-256 of everything after the header; the legacy hash
    the first 8 hex digits of the SHA-256 of the 64 KiB at offset 1 MiB (empty when the file is smaller)."""
    data = _safetensors_bytes(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = struct.unpack("<Q", data[:8])[0]
    model_hash = hashlib.sha256(data[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(data[0x100000:0x100000 + 0x10000]).hexdigest()[:8]
    return model_hash, legacy_hash


def modelspec(facts, title, resolution, trigger_phrase, started_at, description=None, license=None, tags=None):
    """Stability's model spec 1.0 keys (the `Must` ones and those we know) for a LoRA of this base; `facts` (the
    family's header_facts) says the architecture, implementation and prediction type."""
    spec = {
        "modelspec.sai_model_spec": MODELSPEC_VERSION,
        "modelspec.architecture": f"{facts['modelspec.architecture']}/lora",
        "modelspec.implementation": facts["modelspec.implementation"],
        "modelspec.title": title,
        "modelspec.resolution": f"{resolution}x{resolution}",
        "modelspec.prediction_type": facts["modelspec.prediction_type"],
        "modelspec.date": datetime.datetime.fromtimestamp(int(started_at), datetime.timezone.utc).isoformat(),
        "modelspec.trigger_phrase": trigger_phrase,
    }
    for key, value in (("description", description), ("license", license), ("tags", tags)):
        if value:
            spec[f"modelspec.{key}"] = value
    return spec


def training_metadata(facts, run):
    """The ss_* keys. `facts`: the base as the family read it (its header_facts: version, v2, v-prediction, clip
    skip, and any other ss_* key the family writes);
    `run`: what this run did (see lora_io.KohyaRun). Every value is a string, as safetensors headers hold."""
    network_args = {}
    if run.use_dora:
        network_args["dora_wd"] = "True"  # LyCORIS' spelling of weight decomposition, which UIs recognise
    if run.lora_dropout:
        network_args["dropout"] = str(run.lora_dropout)
    meta = {
        "ss_session_id": str(run.session_id),
        "ss_training_started_at": repr(float(run.started_at)),
        "ss_training_finished_at": repr(float(run.finished_at)),
        "ss_output_name": run.output_name,
        "ss_sd_model_name": run.base_model,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(run.rank),
        "ss_network_alpha": str(float(run.alpha)),
        "ss_network_dropout": str(run.lora_dropout),
        "ss_network_args": json.dumps(network_args) if network_args else None,
        "ss_learning_rate": str(run.learning_rate),
        "ss_unet_lr": str(run.learning_rate),
        "ss_text_encoder_lr": str(run.text_encoder_lr) if run.train_text_encoder else None,
        "ss_network_train_unet_only": str(not run.train_text_encoder),
        "ss_optimizer": run.optimizer,
        "ss_lr_scheduler": run.lr_scheduler,
        "ss_seed": str(run.seed),
        "ss_mixed_precision": run.mixed_precision,
        "ss_num_train_images": str(run.num_train_images),
        "ss_num_reg_images": str(run.num_reg_images),
        "ss_prior_loss_weight": str(run.prior_loss_weight),
        "ss_resolution": f"({run.resolution}, {run.resolution})",
        "ss_steps": str(run.steps),
        "ss_max_train_steps": str(run.max_train_steps),
        "ss_training_comment": run.instance_prompt,
        "ss_tag_frequency": json.dumps(run.tag_frequency, ensure_ascii=False),
        "ss_dataset_dirs": json.dumps({name: {"n_repeats": run.repeats, "img_count": run.num_train_images}
                                       for name in run.tag_frequency}, ensure_ascii=False),
    }
    meta.update({k: v for k, v in facts.items() if k.startswith("ss_")})
    return {k: v for k, v in meta.items() if v is not None}


def build(facts, run, tensors):
    """Every header key of the kohya file: ss_*, the hashes over the tensors and ss_* keys, modelspec, and our
    own two (the exact instance prompt, the trainer version)."""
    meta = training_metadata(facts, run)
    meta.update(run.extra)  # before hashing: sd-scripts hashes over the tensors and every ss_* key
    meta["sshs_model_hash"], meta["sshs_legacy_hash"] = addnet_hashes(tensors, meta)
    meta.update(modelspec(facts, run.output_name, run.resolution, run.instance_prompt, run.started_at,
                          description=f"DreamBooth LoRA of {run.base_model}: {run.instance_prompt}",
                          license=run.license, tags="dreambooth,lora"))
    meta["instance_prompt"] = run.instance_prompt
    meta["dreambooth_lora_version"] = run.version
    return meta


def trigger_phrase(metadata):
    """The phrase a LoRA was trained with, from any header that says it (ours, modelspec, or the most frequent
    ss_tag_frequency tag of files from other trainers); None when none does."""
    for key in ("modelspec.trigger_phrase", "instance_prompt"):
        if metadata.get(key):
            return metadata[key]
    try:
        folders = json.loads(metadata.get("ss_tag_frequency") or "{}")
    except ValueError:
        return None
    counts = {}
    for tags in folders.values() if isinstance(folders, dict) else []:
        for tag, n in (tags.items() if isinstance(tags, dict) else []):
            counts[tag] = counts.get(tag, 0) + (n if isinstance(n, int) else 0)
    return max(counts, key=counts.get) if counts else None
