"""Base-model loading and LoRA attachment.

`load_components` returns the pieces of an SD 1.x/2.x pipeline from a hub id, a diffusers folder
or one .safetensors/.ckpt file. The training loop only ever sees these components and
`encode_prompts`, so a model family with other text encoders (SDXL) plugs in here, not there.
"""
import os

from .errors import UsageError, first_line

TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def load_error(model, part, error, flag="--pretrained_model_name_or_path"):
    """One line for a model that would not load: offline mode, no network, or missing/corrupt files."""
    local = os.path.exists(model)
    reason = first_line(error)
    if not local and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return (f"{flag} {model}: cannot load its {part}: it is not in the local cache and HF_HUB_OFFLINE=1 is set; "
                f"unset HF_HUB_OFFLINE, or download it first (hf download {model})")
    if not local:
        return (f"{flag} {model}: cannot load its {part} from the Hub ({reason}); check the id and the network, "
                "or point the flag at a local folder")
    return (f"{flag} {model}: cannot load its {part} ({type(error).__name__}: {reason}); its files are missing or "
            "corrupt: download or convert the model again")


def _loaded(model, part, load, *args, flag="--pretrained_model_name_or_path", **kwargs):
    """Call a library loader; whatever it raises about the user's files becomes one line naming them. Loading
    raises many types (OSError, ValueError, SafetensorError, KeyError from single-file conversion), all of
    which mean the same thing here: these files are not a loadable model."""
    try:
        return load(*args, **kwargs)
    except Exception as e:
        raise UsageError(load_error(model, part, e, flag)) from e


def load_components(model, revision=None, variant=None, tokenizer_name=None, single_file_config=None,
                    prediction_type=None, dtype=None):
    """tokenizer, text_encoder, vae, unet and a DDPM noise scheduler (training needs DDPM's add_noise).
    Weights are loaded straight into `dtype`: no transient fp32 copy of a model that trains in fp16."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    if os.path.isfile(model):
        kwargs = {"safety_checker": None, "requires_safety_checker": False, "torch_dtype": dtype}
        if single_file_config:
            kwargs["config"] = single_file_config
        if prediction_type:
            kwargs["prediction_type"] = prediction_type
        pipe = _loaded(model, "single-file checkpoint", StableDiffusionPipeline.from_single_file, model, **kwargs)
        tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        scheduler_config = pipe.scheduler.config
        del pipe
    else:
        if not tokenizer_name:
            tokenizer = _loaded(model, "tokenizer", AutoTokenizer.from_pretrained, model, revision=revision,
                                subfolder="tokenizer")
        common = {"revision": revision, "variant": variant, "torch_dtype": dtype}
        text_encoder = _loaded(model, "text_encoder", CLIPTextModel.from_pretrained, model, subfolder="text_encoder",
                               **common)
        vae = _loaded(model, "vae", AutoencoderKL.from_pretrained, model, subfolder="vae", **common)
        unet = _loaded(model, "unet", UNet2DConditionModel.from_pretrained, model, subfolder="unet", **common)
        scheduler_config = _loaded(model, "scheduler", DDPMScheduler.load_config, model, subfolder="scheduler",
                                   revision=revision)
    if tokenizer_name:
        tokenizer = _loaded(tokenizer_name, "tokenizer", AutoTokenizer.from_pretrained, tokenizer_name,
                            flag="--tokenizer_name", revision=revision)
    overrides = {"prediction_type": prediction_type} if prediction_type else {}
    noise_scheduler = DDPMScheduler.from_config(scheduler_config, **overrides)
    return tokenizer, text_encoder, vae, unet, noise_scheduler


def freeze(*models):
    for m in models:
        if m is not None:
            m.requires_grad_(False)
            m.eval()


def lora_config(args, target_modules):
    from peft import LoraConfig
    return LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, lora_dropout=args.lora_dropout,
                      init_lora_weights="gaussian", target_modules=target_modules, use_dora=args.use_dora)


def check_lora_targets(unet, target_modules):
    """Names in --lora_target_modules must exist in this UNet and be layers peft can wrap (it matches a name
    against the end of each module path, as here): checked right after loading, before any class image is
    generated or any output is written."""
    import torch
    wrappable = (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Embedding)
    modules = list(unet.named_modules())
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]
    for target in targets:
        matched = [m for n, m in modules if n == target or n.endswith("." + target)]
        if not matched:
            raise UsageError(f"--lora_target_modules: no UNet module named {target}; "
                             "the default is to_q,to_k,to_v,to_out.0")
        if not any(isinstance(m, wrappable) for m in matched):
            children = sorted({n.split(".")[-1] for n, m in modules if isinstance(m, wrappable)
                               and (n.rsplit(".", 1)[0] == target or n.rsplit(".", 1)[0].endswith("." + target))})
            inside = f" (its layers: {target}.{', '.join(children)})" if children else ""
            raise UsageError(f"--lora_target_modules: {target} is a {type(matched[0]).__name__}, and LoRA wraps only "
                             f"Linear, Conv and Embedding layers; name the layers inside it instead{inside}")
    return targets


def size_multiple(vae, unet):
    """The image side every resolution must be a multiple of: the VAE's downsampling times the UNet's."""
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(unet.config.down_block_types) - 1)
    return vae_factor * unet_factor


def check_resolution(vae, unet, resolution, bucket_steps=None):
    """--resolution (and bucket sides) the loaded model can take, checked as soon as it is known."""
    multiple = size_multiple(vae, unet)
    if resolution % multiple:
        hint = " (512 for SD 1.5, 768 for SD 2.1)" if multiple == 64 else ""
        raise UsageError(f"--resolution {resolution} is not a multiple of {multiple}, the smallest size step this "
                         f"model takes; use {max(multiple, resolution // multiple * multiple)} or "
                         f"{(resolution // multiple + 1) * multiple}{hint}")
    if bucket_steps is not None and bucket_steps % multiple:
        raise UsageError(f"--bucket_reso_steps {bucket_steps} is not a multiple of {multiple}, the smallest size "
                         "step this model takes")


def add_lora(unet, text_encoder, args):
    """LoRA on the UNet attention (and the text encoder when asked); trainable params kept in fp32 so
    fp16 mixed precision never tries to unscale fp16 gradients."""
    unet.add_adapter(lora_config(args, check_lora_targets(unet, args.lora_target_modules)))
    if args.train_text_encoder:
        text_encoder.add_adapter(lora_config(args, TEXT_ENCODER_TARGETS))
    for model in (unet, text_encoder if args.train_text_encoder else None):
        if model is not None:
            for p in model.parameters():
                if p.requires_grad:
                    p.data = p.data.float()


def tokenize(tokenizer, prompts, max_length=None):
    """{input_ids, attention_mask} [prompts, max_length]: padded to --tokenizer_max_length (default: the
    tokenizer's own, 77 for CLIP), longer prompts cut."""
    tokens = tokenizer(list(prompts), padding="max_length", truncation=True,
                       max_length=max_length or tokenizer.model_max_length, return_tensors="pt")
    return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}


def encode_prompts(text_encoder, tokens, use_attention_mask=False):
    """UNet conditioning for SD 1.x/2.x: the text encoder's last hidden state. Returned as the UNet's
    keyword arguments, so a family with more conditioning (SDXL: two text encoders, pooled embeddings,
    added time ids) changes this function and load_components, not the training loop. SD's CLIP was
    trained without a padding mask, hence off unless --text_encoder_use_attention_mask."""
    mask = tokens["attention_mask"].to(text_encoder.device) if use_attention_mask else None
    hidden = text_encoder(tokens["input_ids"].to(text_encoder.device), attention_mask=mask, return_dict=False)[0]
    return {"encoder_hidden_states": hidden}


def unet_conditioning(text_encoder, prompt_tokens, batch, precomputed=None, use_attention_mask=False):
    """The UNet keyword arguments for one batch, from encodings made once (--pre_compute_text_embeddings)
    or by running the text encoder. It gets the whole batch so that a family whose conditioning also
    depends on the images (SDXL's size and crop time ids) needs no change in the loop."""
    if precomputed is not None:
        return {k: v[batch["prompt_ids"].to(v.device)] for k, v in precomputed.items()}
    return encode_prompts(text_encoder, {k: v[batch["prompt_ids"]] for k, v in prompt_tokens.items()},
                          use_attention_mask)


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]
