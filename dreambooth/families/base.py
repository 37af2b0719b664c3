"""The seam every model family implements, and what all of them share: loading from a hub id, a diffusers
folder or a single file, one-line load errors, freezing and placing the frozen parts, the sampling pipeline
over the modules already loaded, and the diffusers LoRA layers of each part."""
import os
from dataclasses import dataclass

from ..errors import UsageError, first_line

MODEL_FLAG = "--pretrained_model_name_or_path"


@dataclass
class ModelSource:
    """Where the base model comes from: the flags that say it, and nothing else."""
    path: str
    revision: str = None
    variant: str = None
    tokenizer_name: str = None
    single_file_config: str = None
    prediction_type: str = None
    vae_path: str = None
    cache_dir: str = None

    @classmethod
    def from_args(cls, args):
        return cls(args.pretrained_model_name_or_path, args.revision, args.variant, args.tokenizer_name,
                   args.single_file_config, args.prediction_type, args.pretrained_vae_model_name_or_path,
                   args.cache_dir)


def _causes(error):
    """The exception and what it was raised from: libraries wrap the network's error in their own."""
    chain = [error]
    while len(chain) < 20 and (chain[-1].__cause__ or chain[-1].__context__):
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    return chain


def load_error(model, part, error, flag=MODEL_FLAG):
    """One line for a model that would not load: offline mode, no network, no such repo, or missing/corrupt
    files."""
    local = os.path.exists(model)
    reason = first_line(error)
    if not local and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return (f"{flag} {model}: cannot load its {part}: it is not in the local cache and HF_HUB_OFFLINE=1 is set; "
                f"unset HF_HUB_OFFLINE, or download it first (hf download {model})")
    if not local:
        chain = _causes(error)
        network = [e for e in chain if "Connect" in type(e).__name__ or "Timeout" in type(e).__name__]
        if network:
            return (f"{flag} {model}: cannot reach the Hugging Face Hub to download its {part} "
                    f"({first_line(network[-1])}); check the network, or point the flag at a local folder")
        if any(type(e).__name__ in ("RepositoryNotFoundError", "GatedRepoError") for e in chain):
            return (f"{flag} {model}: no such model on the Hugging Face Hub, or it is private or gated (log in with "
                    "`hf auth login` and accept its license on its page)")
        return (f"{flag} {model}: cannot load its {part} from the Hub ({reason}); check the id and the network, "
                "or point the flag at a local folder")
    return (f"{flag} {model}: cannot load its {part} ({type(error).__name__}: {reason}); its files are missing or "
            "corrupt: download or convert the model again")


def hub_unreachable():
    """Why the Hub cannot be reached, found in a second instead of after huggingface_hub's five retries (about
    half a minute), or None. Behind a proxy a direct connection says nothing, so then we do not look."""
    import socket
    from urllib.parse import urlparse
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY")):
        return None
    from huggingface_hub import constants
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=5).close()
    except OSError as e:
        return f"{url.scheme}://{url.netloc}: {e.strerror or e}"
    return None


def loaded(model, part, load, *args, flag=MODEL_FLAG, **kwargs):
    """Call a library loader; whatever it raises about the user's files becomes one line naming them. Loading
    raises many types (OSError, ValueError, SafetensorError, KeyError from single-file conversion), all of
    which mean the same thing here: these files are not a loadable model."""
    try:
        return load(*args, **kwargs)
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(load_error(model, part, e, flag)) from e


class ModelFamily:
    """Components of one loaded base model and everything that depends on which family it is."""
    name = ""                      # in the start line and the model card
    pipeline_class_name = ""       # diffusers pipeline for class priors, validation and infer.py
    pipeline_class_names = ()      # model_index.json class names this family takes
    default_resolution = 512       # diffusers' script default for the family
    text_encoder_names = ()        # pipeline attributes, also the diffusers LoRA file's key prefixes
    text_encoder_classes = ()      # transformers class of each
    tokenizer_names = ()
    embedding_file_keys = ()       # pivotal tuning: each text encoder's new-token rows' key in <name>_emb.safetensors
    kohya_text_prefixes = ()       # kohya/A1111/ComfyUI prefix of each text encoder's LoRA weights
    pipeline_extras = {}           # constructor arguments the pipeline needs beyond the components
    single_file_extras = {}
    sampling_embedding_names = ()  # what pipe.encode_prompt returns, as pipeline keyword arguments
    unused_text_encoder_layers = False  # some text-encoder LoRA gets no gradient (DDP must be told)

    def __init__(self, tokenizers, text_encoders, vae, unet, noise_scheduler):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.vae, self.unet, self.noise_scheduler = vae, unet, noise_scheduler

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe):
        """The family over an already-loaded pipeline's components (tests)."""
        return cls([getattr(pipe, n) for n in cls.tokenizer_names], [getattr(pipe, n) for n in cls.text_encoder_names],
                   pipe.vae, pipe.unet, pipe.scheduler)

    @classmethod
    def pipeline_class(cls):
        import diffusers
        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def load(cls, source, dtype):
        """The components in `dtype` (no transient fp32 copy of a model that trains in fp16) and a DDPM noise
        scheduler, whose add_noise training needs, from the model's own scheduler config."""
        import transformers
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer
        path = source.path
        if os.path.isfile(path):
            kwargs = dict(cls.single_file_extras, torch_dtype=dtype)
            if source.single_file_config:
                kwargs["config"] = source.single_file_config
            if source.prediction_type:
                kwargs["prediction_type"] = source.prediction_type
            pipe = loaded(path, "single-file checkpoint", cls.pipeline_class().from_single_file, path, **kwargs)
            tokenizers = [getattr(pipe, n) for n in cls.tokenizer_names]
            text_encoders = [getattr(pipe, n) for n in cls.text_encoder_names]
            vae, unet, scheduler_config = pipe.vae, pipe.unet, pipe.scheduler.config
            del pipe
        else:
            common = {"revision": source.revision, "cache_dir": source.cache_dir}
            tokenizers = [loaded(path, name, AutoTokenizer.from_pretrained, path, subfolder=name, **common)
                          for name in cls.tokenizer_names]
            weights = dict(common, variant=source.variant, torch_dtype=dtype)
            text_encoders = [loaded(path, name, getattr(transformers, kind).from_pretrained, path, subfolder=name,
                                    **weights) for name, kind in zip(cls.text_encoder_names, cls.text_encoder_classes)]
            vae = loaded(path, "vae", AutoencoderKL.from_pretrained, path, subfolder="vae", **weights)
            unet = loaded(path, "unet", UNet2DConditionModel.from_pretrained, path, subfolder="unet", **weights)
            scheduler_config = loaded(path, "scheduler", DDPMScheduler.load_config, path, subfolder="scheduler",
                                      **common)
        if source.tokenizer_name:
            tokenizers[0] = loaded(source.tokenizer_name, "tokenizer", AutoTokenizer.from_pretrained,
                                   source.tokenizer_name, flag="--tokenizer_name", revision=source.revision)
        if source.vae_path:  # e.g. SDXL's fp16-fix VAE, SD 1.5's ft-MSE VAE: a VAE folder or a pipeline with vae/
            sub = "vae" if os.path.isdir(os.path.join(source.vae_path, "vae")) else None
            vae = loaded(source.vae_path, "VAE", AutoencoderKL.from_pretrained, source.vae_path, subfolder=sub,
                         torch_dtype=dtype, cache_dir=source.cache_dir, flag="--pretrained_vae_model_name_or_path")
        overrides = {"prediction_type": source.prediction_type} if source.prediction_type else {}
        return cls(tokenizers, text_encoders, vae, unet, DDPMScheduler.from_config(scheduler_config, **overrides))

    # ---- frozen parts ---------------------------------------------------------------------------------------
    def frozen_modules(self):
        return [*self.text_encoders, self.vae, self.unet]

    def freeze(self):
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def vae_dtype(self, weight_dtype):
        """SDXL's VAE overflows in half precision (its config says force_upcast): it stays fp32 then, as in
        diffusers' SDXL script. An fp16-fix VAE (--pretrained_vae_model_name_or_path) does not ask for it."""
        import torch
        return torch.float32 if getattr(self.vae.config, "force_upcast", False) else weight_dtype

    def place(self, device, weight_dtype):
        """The frozen parts on the device in the training dtype (the VAE in vae_dtype)."""
        for module in self.text_encoders + [self.unet]:
            module.to(device, dtype=weight_dtype)
        self.vae.to(device, dtype=self.vae_dtype(weight_dtype))

    def size_multiple(self):
        """The image side every resolution must be a multiple of: the VAE's downsampling times the UNet's."""
        vae_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return vae_factor * 2 ** (len(self.unet.config.down_block_types) - 1)

    def latent_moments(self, pixels):
        """Pixels in [-1, 1] -> the VAE posterior's mean and std, [N, 2C, h, w] in the VAE's dtype. This, not a
        sample, is what --cache_latents keeps: a cached run then still draws a fresh latent every step, as an
        uncached one does (same random numbers, same order), so caching changes the speed, not the training."""
        import torch
        dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
        # contiguous: on CPU the VAE hands back channels-last tensors, and randn_like on those (the noise, next)
        # fills the same numbers in another order, so cached and uncached runs would part ways
        return torch.cat([dist.mean, dist.std], dim=1).contiguous()

    def sample_latents(self, moments, weight_dtype):
        """latent_moments -> the latents the UNet is trained on: one posterior sample (drawn as diffusers'
        DiagonalGaussianDistribution.sample draws it), scaled, and shifted where the VAE says."""
        import torch
        mean, std = moments.to(dtype=self.vae_dtype(weight_dtype)).chunk(2, dim=1)  # on the device they are on
        latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(weight_dtype).contiguous()

    def encode_images(self, pixels, weight_dtype):
        """Pixels in [-1, 1] -> the latents the UNet is trained on."""
        return self.sample_latents(self.latent_moments(pixels), weight_dtype)

    # ---- prompts and the UNet's conditioning ---------------------------------------------------------------
    def tokenize(self, prompts, max_length=None):
        """Per text encoder: {input_ids, attention_mask} [prompts, max_length], padded to --tokenizer_max_length
        (default: the tokenizer's own, 77 for CLIP), longer prompts cut."""
        out = []
        for tokenizer in self.tokenizers:
            tokens = tokenizer(list(prompts), padding="max_length", truncation=True,
                               max_length=max_length or tokenizer.model_max_length, return_tensors="pt")
            out.append({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        return out

    def encode(self, tokens, use_attention_mask=False):
        """{name: tensor [prompts, ...]}: what the prompts contribute to the UNet's conditioning."""
        raise NotImplementedError

    def unet_kwargs(self, encoded, batch):
        """The UNet's keyword arguments for one batch, from its prompts' encodings (rows in batch order)."""
        raise NotImplementedError

    # ---- sampling -----------------------------------------------------------------------------------------
    def sampling_pipeline(self, unet=None, text_encoders=None):
        """The family's pipeline over the modules already loaded (no second model load), with DPM-Solver++ so 25
        steps look like DDPM's 1000. unet/text_encoders: the trained (unwrapped) ones, when they differ."""
        from diffusers import DPMSolverMultistepScheduler
        parts = dict(zip(self.text_encoder_names, text_encoders or self.text_encoders))
        parts.update(zip(self.tokenizer_names, self.tokenizers))
        pipe = self.pipeline_class()(vae=self.vae, unet=unet or self.unet,
                                     scheduler=DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config),
                                     **parts, **self.pipeline_extras)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def generate(self, pipe, **kwargs):
        """PIL images from the pipeline: denoised to latents (under whatever autocast the caller set), then decoded
        by the VAE in its own dtype with autocast off. Under fp16 autocast an fp32 SDXL VAE would still decode in
        fp16 and overflow to black images; the pipeline's own upcast only looks at the VAE's dtype."""
        import torch
        latents = pipe(**kwargs, output_type="latent").images
        vae = self.vae
        with torch.autocast(latents.device.type, enabled=False), torch.no_grad():
            shift = getattr(vae.config, "shift_factor", None) or 0.0
            latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
            pixels = vae.decode(latents, return_dict=False)[0]
        return pipe.image_processor.postprocess(pixels.float(), output_type="pil")

    def sampling_embeddings(self, pipe, prompt):
        """The prompt encoded once for many sampling calls: {pipeline keyword: tensor [1, ...]}."""
        encoded = pipe.encode_prompt(prompt=prompt, device=pipe.device, num_images_per_prompt=1,
                                     do_classifier_free_guidance=True)
        return dict(zip(self.sampling_embedding_names, encoded))

    # ---- LoRA names and card facts --------------------------------------------------------------------------
    def kohya_unet_module(self, path):
        """The kohya/A1111 name of a UNet module path (before the `lora_unet_` prefix and `_` joining)."""
        return path

    def base_model_version(self):
        """kohya's ss_base_model_version for this base."""
        raise NotImplementedError

    def is_v2(self):
        """kohya's ss_v2: an SD 2.x base (A1111 files the LoRA under SD 2 by it)."""
        return False

    def architecture(self):
        """Stability's modelspec.architecture of the base (the LoRA's is this plus /lora)."""
        raise NotImplementedError

    def license(self):
        raise NotImplementedError

    def kohya_facts(self):
        """The base as the kohya file's header describes it, all read from the loaded model."""
        v_pred = self.noise_scheduler.config.prediction_type == "v_prediction"
        sdxl = self.name == "SDXL"
        # SD reads the text encoder's last layer (A1111's clip skip 1); SDXL its penultimate one by design, for
        # which sd-scripts writes None (A1111's clip-skip setting does not apply to it)
        return {"base_model_version": self.base_model_version(), "v2": self.is_v2(), "v_prediction": v_pred,
                "sdxl": sdxl, "architecture": self.architecture(), "clip_skip": "None" if sdxl else "1"}


class PromptEncoder:
    """The run's fixed prompts, tokenized once; encoded per batch by the (possibly training) text encoders, or
    once up front when that is exact (--pre_compute_text_embeddings: frozen text encoders)."""

    def __init__(self, family, prompts, max_length=None, use_attention_mask=False):
        self.family, self.use_attention_mask = family, use_attention_mask
        self.tokens = family.tokenize(prompts, max_length)
        self.encoded = None

    def precompute(self, dtype):
        import torch
        with torch.no_grad():
            self.encoded = {k: v.to(dtype) for k, v in
                            self.family.encode(self.tokens, self.use_attention_mask).items()}

    def conditioning(self, batch):
        """The UNet's keyword arguments for a batch; its rows are batch["prompt_ids"] into the fixed prompts."""
        ids = batch["prompt_ids"]
        if self.encoded is not None:
            encoded = {k: v[ids.to(v.device)] for k, v in self.encoded.items()}
        else:
            encoded = self.family.encode([{k: v[ids] for k, v in t.items()} for t in self.tokens],
                                         self.use_attention_mask)
        return self.family.unet_kwargs(encoded, batch)
