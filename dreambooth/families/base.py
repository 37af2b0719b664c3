"""The seam every model family implements, and what all of them share: loading from a hub id, a diffusers
folder or a single file, one-line load errors, freezing and placing the frozen parts, latents, prompts, the
objective and the denoiser call, the sampling pipeline over the modules already loaded, LoRA names and the facts
the files and the card state."""
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
    def from_flags(cls, flags):
        """From anything with the base-model flags' names: the parsed flags (validation) or run_config.ModelConfig."""
        return cls(flags.pretrained_model_name_or_path, flags.revision, flags.variant, flags.tokenizer_name,
                   flags.single_file_config, flags.prediction_type, flags.pretrained_vae_model_name_or_path,
                   flags.cache_dir)


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


# What makes two VAEs' latents interchangeable: the same channels, scale and shift. An SD 1.x VAE on SDXL (0.18215
# against 0.13025) loads and trains without an error, in the wrong latent space.
LATENT_SPACE = ("latent_channels", "scaling_factor", "shift_factor")


def vae_config_file(path):
    """The config.json of a local VAE folder, or of a pipeline folder's vae/; None otherwise (a hub id)."""
    for candidate in (os.path.join(path, "vae", "config.json"), os.path.join(path, "config.json")):
        if os.path.isfile(candidate):
            return candidate
    return None


def check_vae(base_config, vae_config, vae_path, family_name):
    """--pretrained_vae_model_name_or_path must share the base VAE's latent space (configs as dicts)."""
    def space(config):
        return {k: (config.get(k) or 0.0) if k == "shift_factor" else config.get(k) for k in LATENT_SPACE}
    ours, theirs = space(dict(base_config)), space(dict(vae_config))
    differ = [k for k in LATENT_SPACE if ours[k] is not None and theirs[k] is not None and (
        abs(float(ours[k]) - float(theirs[k])) > 1e-6)]
    if differ:
        show = ", ".join(f"{k} {theirs[k]} (the base's: {ours[k]})" for k in differ)
        raise UsageError(f"--pretrained_vae_model_name_or_path {vae_path} is a VAE for another model family: {show}; "
                         f"give a VAE made for {family_name} bases, or leave the flag out to use the base's own")


class ModelFamily:
    """Components of one loaded base model and everything that depends on which family it is: the seam between
    the generic recipe/loop and a model family. A family module subclasses one of the two kinds below it
    (families/unet.py: DDPM UNets; families/flow.py: flow-matching transformers) and fills in its names."""
    name = ""                      # in the start line and the model card
    pipeline_class_name = ""       # diffusers pipeline for class priors, validation and infer.py
    pipeline_class_names = ()      # model_index.json class names this family takes
    default_resolution = 512       # diffusers' script default for the family
    denoiser_name = "unet"         # pipeline attribute of the denoiser; the diffusers LoRA file's key prefix and
    denoiser_class = ""            # save_lora_weights keyword (<name>_lora_layers); its diffusers class
    scheduler_class = ""           # the noise scheduler training samples from
    default_lora_targets = ""      # --lora_target_modules default (diffusers' script's)
    text_encoder_names = ()        # pipeline attributes, also the diffusers LoRA file's key prefixes
    text_encoder_classes = ()      # transformers class of each
    optional_text_encoders = ()    # names a model folder may leave out (model_index.json null), as the pipeline allows
    tokenizer_names = ()
    text_encoder_lora_targets = ()  # per text encoder: the modules --train_text_encoder puts LoRA on (None: never)
    embedding_file_keys = ()       # pivotal tuning: each text encoder's new-token rows' key in <name>_emb.safetensors
    kohya_text_prefixes = ()       # kohya/A1111/ComfyUI prefix of each text encoder's LoRA weights
    pipeline_extras = {}           # constructor arguments the pipeline needs beyond the components
    single_file_extras = {}
    sampling_embedding_names = ()  # what pipe.encode_prompt returns, as pipeline keyword arguments
    unused_text_encoder_layers = False  # some text-encoder LoRA gets no gradient (DDP must be told)
    inference_steps, guidance_scale = 25, 7.5  # infer.py's and evaluate.py's defaults
    samples_with_guidance = True  # classifier-free guidance (an empty-prompt branch) when sampling
    empty_prompt_is_zeros = False  # the unconditional branch is the empty prompt encoded
    flags = ()                     # flags only this family takes (declared in flag_specs); refused on the others
    flag_defaults = {}             # their defaults here
    common_defaults = {}           # defaults of flags every family takes that differ by family (diffusers' scripts)
    card_tags = ()                 # the model card's family tags
    card_gpu_dtype = "float16"     # the model card snippet's half precision on a GPU (fp32 on a CPU)
    ui_base = "the same"           # "load ___ base checkpoint" in the model card's A1111 section
    a1111 = True                   # AUTOMATIC1111 runs this family (the card tells how to load the LoRA there)

    def __init__(self, tokenizers, text_encoders, vae, denoiser, noise_scheduler, text_encoder_names=None):
        self.tokenizers, self.text_encoders = list(tokenizers), list(text_encoders)
        self.vae, self.denoiser, self.noise_scheduler = vae, denoiser, noise_scheduler
        self.options = {}  # the family's own flags (families/*.py say which), set by configure()
        if text_encoder_names is not None:  # a model without an optional encoder (SD 3 without T5)
            keep = [self.text_encoder_names.index(n) for n in text_encoder_names]
            for attr in ("text_encoder_names", "text_encoder_classes", "tokenizer_names", "text_encoder_lora_targets",
                         "embedding_file_keys", "kohya_text_prefixes"):
                values = getattr(self, attr)
                setattr(self, attr, tuple(values[i] for i in keep if i < len(values)))

    @classmethod
    def pivotal_text_encoders(cls, options):
        """Indices of the text encoders pivotal tuning gives new token rows (default: every one); options: the
        family's flags (Flux: --enable_t5_ti)."""
        return list(range(len(cls.text_encoder_names)))

    def configure(self, **options):
        """The family's own flags (already validated), e.g. SD 3's weighting scheme and T5 sequence length."""
        self.options.update(options)
        return self

    # ---- loading ------------------------------------------------------------------------------------------
    @classmethod
    def from_pipeline(cls, pipe):
        """The family over an already-loaded pipeline's components (tests, evaluate)."""
        names, tokenizers, text_encoders = cls._text_parts(pipe)
        return cls(tokenizers, text_encoders, pipe.vae, getattr(pipe, cls.denoiser_name),
                   cls.training_scheduler(pipe.scheduler.config), names)

    @classmethod
    def _text_parts(cls, pipe):
        """(names, tokenizers, text encoders) of the encoders a loaded pipeline has (SD 3 may lack T5)."""
        names = [n for n in cls.text_encoder_names if getattr(pipe, n, None) is not None]
        return (names, [getattr(pipe, cls.tokenizer_names[cls.text_encoder_names.index(n)]) for n in names],
                [getattr(pipe, n) for n in names])

    @classmethod
    def pipeline_class(cls):
        import diffusers
        return getattr(diffusers, cls.pipeline_class_name)

    @classmethod
    def training_scheduler(cls, config, source=None):
        """The scheduler training samples noise levels from, built from the model's own scheduler config."""
        import diffusers
        return getattr(diffusers, cls.scheduler_class).from_config(config)

    @classmethod
    def _absent(cls, source):
        """Optional text encoders the model folder leaves out (model_index.json says null)."""
        index = os.path.join(source.path, "model_index.json")
        if not cls.optional_text_encoders or not os.path.isfile(index):
            return set()
        import json
        with open(index, encoding="utf-8") as f:
            spec = json.load(f)
        return {n for n in cls.optional_text_encoders if not any(spec.get(n) or [None])}

    @classmethod
    def missing_part(cls, path):
        """The first component folder a local diffusers model lacks (a cut download: no text_encoder_2/ with
        Flux's T5), or None. Optional text encoders that model_index.json leaves out are not missing."""
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            return None
        absent = cls._absent(ModelSource(path))
        names = [n for n in cls.text_encoder_names if n not in absent]
        names += [cls.tokenizer_names[cls.text_encoder_names.index(n)] for n in names]
        for name in names + ["vae", cls.denoiser_name, "scheduler"]:
            if not os.path.isdir(os.path.join(path, name)):
                return name
        return None

    @classmethod
    def from_pretrained_extras(cls, path):
        """Keyword arguments a pipeline's from_pretrained needs for this model folder: None for each optional text
        encoder (and its tokenizer) the folder leaves out, which diffusers otherwise refuses to load."""
        absent = cls._absent(ModelSource(path)) if os.path.isdir(path) else set()
        return {name: None for n in absent for name in (n, cls.tokenizer_names[cls.text_encoder_names.index(n)])}

    @classmethod
    def load(cls, source, dtype, quantization=None, device="cpu", quantize_text_encoders=()):
        """The components in `dtype` (no transient fp32 copy of a model that trains in fp16) and the training noise
        scheduler, from the model's own scheduler config. quantization: BitsAndBytesConfig fields (quantize.py) for
        the denoiser and the text encoders named in quantize_text_encoders, quantized as they load, on `device`."""
        import diffusers
        import transformers
        from transformers import AutoTokenizer

        from .. import quantize
        path = source.path

        def weights_of(part, library, load):
            if quantization and (part == cls.denoiser_name or part in quantize_text_encoders):
                return quantize.load_quantized(load, quantization, dtype, device, library)
            return load()
        if os.path.isfile(path):
            kwargs = dict(cls.single_file_extras, torch_dtype=dtype)
            if source.single_file_config:
                kwargs["config"] = source.single_file_config
            if source.prediction_type:
                kwargs["prediction_type"] = source.prediction_type
            pipe = loaded(path, "single-file checkpoint", cls.pipeline_class().from_single_file, path, **kwargs)
            names, tokenizers, text_encoders = cls._text_parts(pipe)
            vae, denoiser, scheduler_config = pipe.vae, getattr(pipe, cls.denoiser_name), pipe.scheduler.config
            del pipe
        else:
            absent = cls._absent(source)
            names = [n for n in cls.text_encoder_names if n not in absent]
            common = {"revision": source.revision, "cache_dir": source.cache_dir}
            tokenizers = [loaded(path, tok, AutoTokenizer.from_pretrained, path, subfolder=tok, **common)
                          for name, tok in zip(cls.text_encoder_names, cls.tokenizer_names) if name in names]
            weights = dict(common, variant=source.variant, torch_dtype=dtype)
            text_encoders = [loaded(path, name, weights_of, name, "transformers",
                                    lambda kind=kind, name=name, **q: getattr(transformers, kind).from_pretrained(
                                        path, subfolder=name, **weights, **q))
                             for name, kind in zip(cls.text_encoder_names, cls.text_encoder_classes) if name in names]
            vae = loaded(path, "vae", diffusers.AutoencoderKL.from_pretrained, path, subfolder="vae", **weights)
            denoiser = loaded(path, cls.denoiser_name, weights_of, cls.denoiser_name, "diffusers",
                              lambda **q: getattr(diffusers, cls.denoiser_class).from_pretrained(
                                  path, subfolder=cls.denoiser_name, **weights, **q))
            scheduler_config = loaded(path, "scheduler", getattr(diffusers, cls.scheduler_class).load_config, path,
                                      subfolder="scheduler", **common)
        if source.tokenizer_name:
            tokenizers[0] = loaded(source.tokenizer_name, "tokenizer", AutoTokenizer.from_pretrained,
                                   source.tokenizer_name, flag="--tokenizer_name", revision=source.revision)
        if source.vae_path:  # e.g. SDXL's fp16-fix VAE, SD 1.5's ft-MSE VAE: a VAE folder or a pipeline with vae/
            sub = "vae" if os.path.isdir(os.path.join(source.vae_path, "vae")) else None
            own = dict(vae.config)
            vae = loaded(source.vae_path, "VAE", diffusers.AutoencoderKL.from_pretrained, source.vae_path,
                         subfolder=sub, torch_dtype=dtype, cache_dir=source.cache_dir,
                         flag="--pretrained_vae_model_name_or_path")
            check_vae(own, vae.config, source.vae_path, cls.name)
        return cls(tokenizers, text_encoders, vae, denoiser, cls.training_scheduler(scheduler_config, source), names)

    # ---- frozen parts ---------------------------------------------------------------------------------------
    def frozen_modules(self):
        return [*self.text_encoders, self.vae, self.denoiser]

    def freeze(self):
        for module in self.frozen_modules():
            module.requires_grad_(False)
            module.eval()

    def vae_dtype(self, weight_dtype):
        """SDXL's VAE overflows in half precision (its config says force_upcast): it stays fp32 then, as in
        diffusers' SDXL script. An fp16-fix VAE (--pretrained_vae_model_name_or_path) does not ask for it."""
        import torch
        return torch.float32 if getattr(self.vae.config, "force_upcast", False) else weight_dtype

    def castable_modules(self):
        """The frozen parts whose dtype may change: a quantized model stays as bitsandbytes stored it (and on the
        device it was quantized on)."""
        from ..quantize import is_quantized
        return [m for m in self.frozen_modules() if not is_quantized(m)]

    def place(self, device, weight_dtype):
        """The frozen parts on the device in the training dtype (the VAE in vae_dtype); quantized ones are there."""
        for module in self.text_encoders + [self.denoiser]:
            if module in self.castable_modules():
                module.to(device, dtype=weight_dtype)
        self.vae.to(device, dtype=self.vae_dtype(weight_dtype))

    def vae_scale(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def size_multiple(self):
        """The image side every resolution must be a multiple of (the VAE's downsampling times the denoiser's)."""
        raise NotImplementedError

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
        """latent_moments -> the latents the denoiser is trained on: one posterior sample (drawn as diffusers'
        DiagonalGaussianDistribution.sample draws it), shifted where the VAE says (SD 3, Flux) and scaled."""
        import torch
        mean, std = moments.to(dtype=self.vae_dtype(weight_dtype)).chunk(2, dim=1)  # on the device they are on
        latents = mean + std * torch.randn(mean.shape, device=mean.device, dtype=mean.dtype)
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        return ((latents - shift) * self.vae.config.scaling_factor).to(weight_dtype).contiguous()

    def encode_images(self, pixels, weight_dtype):
        """Pixels in [-1, 1] -> the latents the denoiser is trained on."""
        return self.sample_latents(self.latent_moments(pixels), weight_dtype)

    # ---- prompts, conditioning, the objective and the denoiser call ----------------------------------------
    def max_lengths(self, max_length=None):
        """Tokens per prompt for each tokenizer: --tokenizer_max_length, else the tokenizer's own (77 for CLIP)."""
        return [max_length or tokenizer.model_max_length for tokenizer in self.tokenizers]

    def tokenize(self, prompts, max_length=None):
        """Per text encoder: {input_ids, attention_mask} [prompts, length], padded to max_lengths(), longer prompts
        cut."""
        out = []
        for tokenizer, length in zip(self.tokenizers, self.max_lengths(max_length)):
            tokens = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=length,
                               return_tensors="pt")
            out.append({"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask})
        return out

    def encode(self, tokens, use_attention_mask=False):
        """{name: tensor [prompts, ...]}: what the prompts contribute to the denoiser's conditioning."""
        raise NotImplementedError

    def conditioning(self, encoded, batch):
        """The denoiser's keyword arguments for one batch, from its prompts' encodings (rows in batch order)."""
        raise NotImplementedError

    def objective(self, noise_offset=0.0, snr_gamma=None):
        """How this family's training examples are noised and what its denoiser predicts (objectives.py)."""
        raise NotImplementedError

    def denoise(self, denoiser, noisy, timesteps, conditioning, batch):
        """The denoiser's output for noisy latents [N, C, h, w], in the same layout (a family that packs latents
        into tokens unpacks them here)."""
        raise NotImplementedError

    # ---- sampling -----------------------------------------------------------------------------------------
    @classmethod
    def sampling_scheduler(cls, config):
        """The scheduler the family samples with in class priors, validation, infer.py and evaluate.py."""
        raise NotImplementedError

    @classmethod
    def default_size(cls, pipe):
        """The image side a loaded pipeline of this family makes by default."""
        return getattr(pipe, cls.denoiser_name).config.sample_size * pipe.vae_scale_factor

    @classmethod
    def sampling_flag_problem(cls, pipe, negative_prompt, guidance_given, guidance):
        """A sampling flag the family's pipeline would ignore without a word, as one line (None when every one
        applies): a negative prompt is read only by classifier-free guidance, which runs above 1."""
        if negative_prompt is not None and guidance <= 1:
            return (f"--negative_prompt is not used at --guidance_scale {guidance:g} (classifier-free guidance, which "
                    "reads it, runs only above 1); raise --guidance_scale or leave --negative_prompt out")
        return None

    @classmethod
    def sampling_size_multiple(cls, pipe):
        """What a loaded pipeline's image sides must be a multiple of: the VAE's downsampling (a UNet takes any
        latent size); the flow families add their 2x2 patches. Their pipelines refuse other sizes deep inside
        (SD 3) or round them silently (Flux); infer.py and evaluate.py refuse them in one line first."""
        return pipe.vae_scale_factor

    def sampling_pipeline(self, denoiser=None, text_encoders=None):
        """The family's pipeline over the modules already loaded (no second model load). denoiser/text_encoders:
        the trained (unwrapped) ones, when they differ."""
        parts = dict(zip(self.text_encoder_names, text_encoders or self.text_encoders))
        parts.update(zip(self.tokenizer_names, self.tokenizers))
        for name in self.optional_text_encoders:  # left out by this model: the pipeline takes None
            if name not in parts:
                parts[name] = None
                parts[type(self).tokenizer_names[type(self).text_encoder_names.index(name)]] = None
        parts[self.denoiser_name] = denoiser or self.denoiser
        pipe = self.pipeline_class()(vae=self.vae, scheduler=self.sampling_scheduler(self.noise_scheduler.config),
                                     **parts, **self.pipeline_extras)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    own_sampler_only = False        # samples with its own scheduler only (flow matching: infer.py's --scheduler)

    @classmethod
    def diffusers_state_from_ui(cls, state):
        """Our UI file as the state dict the family's load_lora_weights reads, or None when it reads the file as
        it is (kohya files of SD / SDXL)."""
        return None

    def decodable_latents(self, pipe, latents, kwargs):
        """What pipe(output_type="latent") returned, as VAE latents [N, C, h, w] (Flux unpacks its tokens)."""
        return latents

    def generate(self, pipe, **kwargs):
        """PIL images from the pipeline: denoised to latents (under whatever autocast the caller set), then decoded
        by the VAE in its own dtype with autocast off. Under fp16 autocast an fp32 SDXL VAE would still decode in
        fp16 and overflow to black images; the pipeline's own upcast only looks at the VAE's dtype."""
        import torch
        latents = self.decodable_latents(pipe, pipe(**kwargs, output_type="latent").images, kwargs)
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
    def ui_denoiser_key(self, module):
        """The UI (kohya/A1111/ComfyUI) file's name of a denoiser module path, before .lora_down/.lora_up/.alpha."""
        raise NotImplementedError

    def header_facts(self):
        """The base as the kohya file's header describes it, as header keys (ss_* and modelspec.*) -> strings,
        all read from the loaded model."""
        raise NotImplementedError

    def license(self):
        raise NotImplementedError

    @classmethod
    def made_lora(cls, keys):
        """Whether a LoRA file with these tensor names was made for this family (infer.py names the family a LoRA
        was made for when it does not fit the base)."""
        return False

    @classmethod
    def defaults(cls, args):
        """The defaults of this family's flags and of the shared flags whose default differs by family."""
        return {**cls.common_defaults, **cls.flag_defaults}

    @classmethod
    def inference_defaults(cls, pipe):
        """(steps, guidance scale) for infer.py on a loaded pipeline of this family."""
        return cls.inference_steps, cls.guidance_scale


class PromptEncoder:
    """The run's fixed prompts, tokenized once; encoded per batch by the (possibly training) text encoders, or
    once up front when that is exact (--pre_compute_text_embeddings: frozen text encoders)."""

    def __init__(self, family, prompts, max_length=None, use_attention_mask=False, zero_ids=()):
        self.family, self.use_attention_mask = family, use_attention_mask
        self.tokens = family.tokenize(prompts, max_length)
        self.encoded = None
        self.zero_ids = tuple(zero_ids)  # rows encoded as zeros (SDXL's empty prompt, as its pipeline samples it)

    def precompute(self, dtype):
        import torch
        with torch.no_grad():
            self.encoded = {k: v.to(dtype) for k, v in
                            self.family.encode(self.tokens, self.use_attention_mask).items()}

    def conditioning(self, batch):
        """The denoiser's keyword arguments for a batch; its rows are batch["prompt_ids"] into the fixed prompts."""
        ids = batch["prompt_ids"]
        if self.encoded is not None:
            encoded = {k: v[ids.to(v.device)] for k, v in self.encoded.items()}
        else:
            encoded = self.family.encode([{k: v[ids.to(v.device)] for k, v in t.items()} for t in self.tokens],
                                         self.use_attention_mask)
        if self.zero_ids:
            import torch
            keep = ~torch.isin(ids, torch.tensor(self.zero_ids, device=ids.device))
            encoded = {k: v * keep.to(v.device, v.dtype).reshape(-1, *[1] * (v.dim() - 1)) for k, v in encoded.items()}
        return self.family.conditioning(encoded, batch)
