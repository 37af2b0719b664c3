"""Base-model loading and LoRA attachment.

`load_components` returns the pieces of an SD 1.x/2.x pipeline from a hub id, a diffusers folder
or one .safetensors/.ckpt file. The training loop only ever sees these components and
`encode_prompts`, so a model family with other text encoders (SDXL) plugs in here, not there.
"""
import os


TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


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
        pipe = StableDiffusionPipeline.from_single_file(model, **kwargs)
        tokenizer, text_encoder, vae, unet = pipe.tokenizer, pipe.text_encoder, pipe.vae, pipe.unet
        scheduler_config = pipe.scheduler.config
        del pipe
    else:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name or model, revision=revision,
                                                  **({} if tokenizer_name else {"subfolder": "tokenizer"}))
        common = {"revision": revision, "variant": variant, "torch_dtype": dtype}
        text_encoder = CLIPTextModel.from_pretrained(model, subfolder="text_encoder", **common)
        vae = AutoencoderKL.from_pretrained(model, subfolder="vae", **common)
        unet = UNet2DConditionModel.from_pretrained(model, subfolder="unet", **common)
        scheduler_config = DDPMScheduler.load_config(model, subfolder="scheduler", revision=revision)
    if tokenizer_name and os.path.isfile(model):
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_name, revision=revision)
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
    """Names in --lora_target_modules must exist in this UNet: checked right after loading, before any
    class image is generated or any output is written."""
    from .config import UsageError
    names = [n for n, _ in unet.named_modules()]
    targets = [m.strip() for m in target_modules.split(",") if m.strip()]
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UsageError(f"--lora_target_modules: no UNet module named {', '.join(missing)}; "
                         "the default is to_q,to_k,to_v,to_out.0")
    return targets


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


def tokenize(tokenizer, prompts):
    return tokenizer(list(prompts), padding="max_length", truncation=True,
                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids


def encode_prompts(text_encoder, input_ids):
    """UNet conditioning for SD 1.x/2.x: the text encoder's last hidden state. Returned as the UNet's
    keyword arguments, so a family with more conditioning (SDXL: two text encoders, pooled embeddings,
    added time ids) changes this function and load_components, not the training loop."""
    return {"encoder_hidden_states": text_encoder(input_ids.to(text_encoder.device), return_dict=False)[0]}


def unet_conditioning(text_encoder, prompt_ids, batch, precomputed=None):
    """The UNet keyword arguments for one batch, from encodings made once (--pre_compute_text_embeddings)
    or by running the text encoder. It gets the whole batch so that a family whose conditioning also
    depends on the images (SDXL's size and crop time ids) needs no change in the loop."""
    if precomputed is not None:
        return {k: v[batch["prompt_ids"].to(v.device)] for k, v in precomputed.items()}
    return encode_prompts(text_encoder, prompt_ids[batch["prompt_ids"]])


def trainable_parameters(model):
    return [p for p in model.parameters() if p.requires_grad]
