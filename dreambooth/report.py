"""What a run reports: trackers, step timing and memory (train_stats.json), loss.png, config.yaml and the
model card README.md."""
import datetime
import importlib.util
import json
import os
import re
import shlex
import statistics
import sys
import time

from PIL import Image, ImageDraw

from .config import recipe_yaml
from .files import write_text


def rss_mb():
    """Peak resident memory of this process so far (Linux/macOS); current RSS elsewhere."""
    try:
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / (1024 * 1024 if sys.platform == "darwin" else 1024)
    except ImportError:
        return current_rss_mb()


def current_rss_mb():
    import psutil  # an accelerate dependency
    return psutil.Process().memory_info().rss / 2**20


def restart_peak_rss():
    """Linux lets a process restart its peak-RSS counter (VmHWM), so the training steps' own peak can be read
    exactly afterwards instead of sampled; loading a model maps its whole file and would otherwise hide it.
    False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_restart_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return 0.0


def _cuda():
    """torch.cuda when this process has used a GPU, else None (never initialises CUDA just to ask)."""
    torch = sys.modules.get("torch")
    return torch.cuda if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized() else None


class RunStats:
    """Wall-clock split of a run: setup (flags to first step), class generation, steady-state step time
    (median, checkpoint and validation pauses excluded), and memory: the process's peak RSS, and the peak
    during the training steps alone (exact on Linux, sampled after steps elsewhere)."""

    def __init__(self):
        self.started = time.perf_counter()
        self.baseline_rss_mb = rss_mb()
        self.values = {}
        self.step_seconds = []
        self.setup_peak_rss_mb = 0.0
        self.exact_train_peak = False
        self._restartable = False  # the peak-RSS counter was restarted at the last phase
        self.sampled_train_peak_rss_mb = 0.0
        self._tick = None

    def set(self, **values):
        self.values.update(values)

    def phase(self, name):
        """Closes a set-up phase (load, class_images, caching): its peak RSS (exact on Linux, where the counter
        restarts after each phase) and, on CUDA, its peak VRAM, into train_stats.json's phase_peaks."""
        peaks = self.values.setdefault("phase_peaks", {})
        peaks[name] = {"peak_rss_mb": round(peak_rss_since_restart_mb() if self._restartable else rss_mb(), 1)}
        self._restartable = restart_peak_rss()
        cuda = _cuda()
        if cuda:
            peaks[name]["peak_vram_mb"] = round(cuda.max_memory_allocated() / 2**20, 1)
            cuda.reset_peak_memory_stats()

    def phase_line(self, name):
        peak = self.values["phase_peaks"][name]
        vram = f", peak VRAM {peak['peak_vram_mb']:.0f} MiB" if "peak_vram_mb" in peak else ""
        return f"{name}: peak RSS {peak['peak_rss_mb']:.0f} MiB{vram}"

    def mark_training_start(self):
        self.values["setup_seconds"] = time.perf_counter() - self.started - self.values.get("class_generation_seconds", 0)
        # read before the restart: on Linux ru_maxrss follows VmHWM down (and the two can differ by a few pages);
        # the phases restarted the counter, so the set-up's peak is the largest of theirs and what is left
        self.setup_peak_rss_mb = max([rss_mb()] + [p["peak_rss_mb"] for p in self.values.get("phase_peaks",
                                                                                             {}).values()])
        self.exact_train_peak = restart_peak_rss()
        cuda = _cuda()
        if cuda:  # the training steps' own peak, as for RSS; the setup's is kept
            self.values["setup_peak_vram_mb"] = cuda.max_memory_allocated() / 2**20
            cuda.reset_peak_memory_stats()
        self._tick = time.perf_counter()

    def step_done(self):
        now = time.perf_counter()
        self.step_seconds.append(now - self._tick)
        if not self.exact_train_peak and len(self.step_seconds) % 10 in (1, 3):  # tens of microseconds
            self.sampled_train_peak_rss_mb = max(self.sampled_train_peak_rss_mb, current_rss_mb())
        self._tick = time.perf_counter()

    def pause_done(self):
        self._tick = time.perf_counter()

    def summary(self):
        steady = self.step_seconds[2:] or self.step_seconds
        cuda = _cuda()
        if cuda and self.step_seconds:  # torch.cuda.max_memory_allocated: tensors only, not the allocator's cache
            self.values["train_peak_vram_mb"] = cuda.max_memory_allocated() / 2**20
        train_peak = peak_rss_since_restart_mb() if self.exact_train_peak else self.sampled_train_peak_rss_mb
        return dict(self.values, steps_timed=len(self.step_seconds),
                    step_seconds_median=statistics.median(steady) if steady else None,
                    # on a GPU the host waits only at loss reads (--logging_steps), so the mean is the honest one
                    step_seconds_mean=statistics.fmean(steady) if steady else None,
                    baseline_rss_mb=self.baseline_rss_mb, peak_rss_mb=max(self.setup_peak_rss_mb, train_peak, rss_mb()),
                    setup_peak_rss_mb=self.setup_peak_rss_mb, train_peak_rss_mb=train_peak,
                    total_seconds=time.perf_counter() - self.started)

    def write(self, path):
        write_text(path, json.dumps(self.summary(), indent=2))


def plot_loss(history, path, width=640, height=320):
    """Loss per step and its running mean, drawn with PIL (no plotting library needed)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    pad = 40
    draw.rectangle((pad, 10, width - 10, height - pad), outline=(120, 120, 120))
    if len(history) >= 1:
        steps = [s for s, _ in history]
        losses = [v for _, v in history]
        lo, hi = min(losses), max(losses)
        hi = hi if hi > lo else lo + 1e-6
        s0, s1 = steps[0], max(steps[-1], steps[0] + 1)

        def xy(step, value):
            return (pad + (step - s0) / (s1 - s0) * (width - pad - 10),
                    height - pad - (value - lo) / (hi - lo) * (height - pad - 10))
        draw.line([xy(s, v) for s, v in history], fill=(170, 190, 230), width=1)
        window = max(1, len(losses) // 20)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        draw.line([xy(s, v) for s, v in zip(steps, smooth)], fill=(20, 60, 200), width=2)
        draw.text((pad, height - pad + 5), f"step {s0}", fill="black")
        draw.text((width - 90, height - pad + 5), f"step {steps[-1]}", fill="black")
        draw.text((2, 10), f"{hi:.3g}", fill="black")
        draw.text((2, height - pad - 12), f"{lo:.3g}", fill="black")
    draw.text((width // 2 - 30, height - 20), "training loss", fill="black")
    from .files import atomic_write
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def available_trackers(report_to, warn=print):
    """accelerate trackers named by --report_to that are installed; the others are skipped with a note."""
    if report_to in (None, "", "none"):
        return []
    names = ["tensorboard", "wandb"] if report_to == "all" else [n.strip() for n in report_to.split(",")]
    found = []
    for name in names:
        module = name  # names were checked in config.validate
        if importlib.util.find_spec(module) is None and not (name == "tensorboard" and
                                                             importlib.util.find_spec("tensorboardX")):
            warn(f"warning: --report_to {name}: {module} is not installed (pip install {module}); not logging to it")
        else:
            found.append(name)
    return found


def redacted(argv):
    """The command line with the Hub token's value replaced, in every spelling argparse accepts and wherever else
    the token's value appears: the card is uploaded and shown publicly."""
    from .redaction import redact_argv
    return redact_argv(argv)


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
USE_RESTRICTIONS = {  # what each base licence asks of whoever uses a derivative, in one line for the card
    "creativeml-openrail-m": "CreativeML Open RAIL-M: the use restrictions of its Attachment A (no unlawful, harmful, "
                             "defamatory or deceptive uses, no medical or legal advice, ...) pass on to this LoRA and "
                             "to every image made with it, and must be passed on to anyone you share it with.",
    "openrail++": "CreativeML Open RAIL++-M: the use restrictions of its Attachment A (no unlawful, harmful, "
                  "defamatory or deceptive uses, ...) pass on to this LoRA and to every image made with it, and must be "
                  "passed on to anyone you share it with.",
}


def _front_matter(path):
    """The YAML block at the top of a model card, as a dict ({} when unreadable or absent)."""
    import yaml
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    try:
        data = yaml.safe_load(text.split("---", 2)[1])
    except (yaml.YAMLError, IndexError):
        return {}
    return data if isinstance(data, dict) else {}


def _local_card(model, cache_dir=None, revision=None):
    """The base's own README.md, from its folder or (for a hub id) the local Hugging Face cache: no download."""
    if os.path.isdir(model):
        return os.path.join(model, "README.md")
    if os.path.isfile(model):
        return os.path.join(os.path.dirname(model), "README.md")
    try:
        from huggingface_hub import try_to_load_from_cache
        found = try_to_load_from_cache(model, "README.md", cache_dir=cache_dir, revision=revision)
    except Exception:  # a malformed id: no card to read
        return None
    return found if isinstance(found, str) else None


def base_hub_id(model):
    """The base as a Hub id, for the card's base_model (the Hub links the LoRA to it): the flag itself when it is
    one, the repo of a Hub cache snapshot folder, or the `_name_or_path` its configs were saved with; None for a
    purely local model."""
    if not os.path.exists(model):
        return model if HUB_ID.match(model) else None
    found = re.search(r"models--([^/\\]+?)--([^/\\]+)[/\\]snapshots", os.path.abspath(model))
    if found:
        return f"{found[1]}/{found[2]}"
    folder = model if os.path.isdir(model) else os.path.dirname(model)
    for config in ("model_index.json", "unet/config.json", "text_encoder/config.json"):
        try:
            with open(os.path.join(folder, config), encoding="utf-8") as f:
                name = json.load(f).get("_name_or_path", "")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and HUB_ID.match(name) and not os.path.exists(name):
            return name
    return None


def base_license(model, family=None, cache_dir=None, revision=None):
    """(licence id, where it came from): the base's own card when it is readable here, else the licence the
    family's released weights carry (SD 1.x: creativeml-openrail-m; SD 2.x, SDXL: openrail++)."""
    card = _local_card(model, cache_dir, revision)
    license = _front_matter(card).get("license") if card else None
    if isinstance(license, str) and license:
        return license, "the base model's card"
    return (family.license(), f"the {family.name} family's licence") if family else ("other", "unknown")


def training_metadata(instance_prompt, pivotal=None, embedding_name=None):
    """Extra kohya metadata with pivotal tuning: the embeddings file and the prompt that uses it (A1111/ComfyUI:
    the embedding's file name is its word). ss_optimizer comes with the rest (lora_io.KohyaRun.optimizer)."""
    if pivotal is None:
        return {}
    return {"ss_embeddings": embedding_name, "ss_token_map": json.dumps(pivotal.mapping),
            "ss_embedding_prompt": pivotal.ui_prompt(instance_prompt, embedding_name)}


ADD_ROWS = """

def add_rows(rows, token, text_encoder, tokenizer):  # new tokens and their embedding rows
    tokenizer.add_tokens(token)
    text_encoder.resize_token_embeddings(len(tokenizer))
    ids = tokenizer.convert_tokens_to_ids(token)
    text_encoder.get_input_embeddings().weight.data[ids] = rows.to(text_encoder.device, text_encoder.dtype)

"""


class PivotalUsage:
    """With pivotal tuning, what the model card tells a user: the diffusers prompt (new tokens in place of the
    word), the UI prompt (the embedding file's name in place of it), the lines that load the embeddings, and the
    section about the tokens."""

    def __init__(self, instance_prompt, output_dir, pivotal, embedding_name, where=None):
        family = pivotal.family
        self.word = embedding_name.removesuffix(".safetensors")
        self.prompt = pivotal.prompt_example(instance_prompt)
        self.ui_prompt = pivotal.ui_prompt(instance_prompt, embedding_name)
        # A pushed run's card is read on the Hub: the file comes from the repo, not from the trainer's disk.
        source = (f'hf_hub_download("{where}", "{embedding_name}")' if where
                  else json.dumps(os.path.join(output_dir, embedding_name)))
        self.imports = ("from huggingface_hub import hf_hub_download\n" if where else "") + \
            "from safetensors.torch import load_file\n"
        loader = ("pipe.load_textual_inversion" if hasattr(family.pipeline_class(), "load_textual_inversion")
                  else "add_rows")  # StableDiffusion3Pipeline has none: the card defines the three steps
        self.imports += ("" if loader != "add_rows" else ADD_ROWS)
        self.load_code = f"emb = load_file({source})\n" + "\n".join(
            f'{loader}(emb["{key}"], token={json.dumps(pivotal.tokens)}, text_encoder=pipe.{enc}, '
            f'tokenizer=pipe.{family.tokenizer_names[i]})'
            for key, enc, i in zip(pivotal.keys, (family.text_encoder_names[i] for i in pivotal.indices),
                                   pivotal.indices)) + "\n"
        self.section = f"""
## Trained tokens (pivotal tuning)

`{embedding_name}` holds the new tokens' embeddings ({', '.join(f'`{w}` -> `{"".join(t)}`' for w, t in
pivotal.mapping.items())}); load it with the LoRA. The prompt to use:

- diffusers and `infer.py`: `{self.prompt}` (the snippet above loads the file; infer.py loads it from the
  LoRA folder and rewrites `{', '.join(pivotal.mapping)}` in prompts itself)
- AUTOMATIC1111 / ComfyUI (the file in `embeddings/`): `{self.ui_prompt}` (ComfyUI: `embedding:{self.word}`)
"""


def pivotal_usage(run, record, pivotal, embedding_name):
    """PivotalUsage for the model card, or None without pivotal tuning."""
    if pivotal is None:
        return None
    return PivotalUsage(run.data.instance_prompt, run.outputs.output_dir, pivotal, embedding_name, record.hub_repo_id)


def write_run_files(run, record, steps, seconds, family=None, kohya_file=None, pivotal=None):
    """config.yaml to repeat the run, README.md model card: the Hub's YAML block (licence, base model, tags,
    instance prompt, widget), how to use the LoRA in diffusers, ComfyUI and A1111, the settings and the command.
    run: the checked settings (run_config.RunConfig); record: what the run decided (RunRecord)."""
    output_dir = run.outputs.output_dir
    write_text(os.path.join(output_dir, "config.yaml"), recipe_yaml(run, record))
    command = "accelerate launch train_dreambooth_lora.py " + " ".join(
        shlex.quote(a) for a in redacted(sys.argv[1:] if run.argv is None else run.argv))
    write_text(os.path.join(output_dir, "README.md"), model_card(run, record, steps, seconds, family, kohya_file,
                                                                 command, pivotal))


def prior_text(prior):
    if not prior.with_prior_preservation:
        return "off"
    if prior.base_output:
        return (f"`{prior.class_prompt}`, the base model's own output as the target on {prior.num_class_images} of "
                f"its sampling paths (no class images), weight {prior.prior_loss_weight}")
    return f"`{prior.class_prompt}`, {prior.num_class_images} images, weight {prior.prior_loss_weight}"


def base_weights_text(quantization, memory, mixed_precision):
    """What the frozen base was stored in while the LoRA trained (a quantized base samples class images and
    validation from the quantized weights too, unless --sample_with_full_base)."""
    from .quantize import describe
    if quantization is None:
        return f"as loaded ({mixed_precision or 'fp32'})"
    encoders = " and the frozen text encoders" if memory.quantize_text_encoders else ""
    samples = ("class images from the full base, validation from the quantized one"
               if memory.sample_with_full_base else "class images and validation sampled from it")
    return (f"{describe(quantization)} (bitsandbytes) for the denoiser{encoders}; {samples}. The LoRA was trained in "
            "full precision and loads on the unquantized base")


def objective_text(family_options, training):
    """The training objective as the card's settings table states it (flow matching's flags, or DDPM's)."""
    if family_options.get("weighting_scheme"):
        return (f"flow matching, --weighting_scheme {family_options['weighting_scheme']}"
                + (", preconditioned outputs" if family_options.get("precondition_outputs") else ""))
    extras = [f"min-SNR gamma {training.snr_gamma}" if training.snr_gamma else "",
              f"noise offset {training.noise_offset}" if training.noise_offset else ""]
    return ", ".join(["DDPM (the scheduler's prediction type)", *filter(None, extras)])


def model_card(run, record, steps, seconds, family, kohya_file, command, pivotal=None):
    """The README.md text; `pivotal` is a PivotalUsage when new tokens were trained (its prompt and loading lines
    replace the plain ones in the diffusers snippet)."""
    import yaml
    data, lora, opt, training = run.data, run.lora, run.optimizer, run.training
    output_dir = run.outputs.output_dir
    model = str(run.model.pretrained_model_name_or_path)
    hub_id = base_hub_id(model)
    license, license_source = base_license(model, family, run.model.cache_dir, run.model.revision)
    validation = os.path.join(output_dir, "validation")
    grids = sorted(os.listdir(validation)) if os.path.isdir(validation) else []
    pushed = record.hub_repo_id
    pipeline = family.pipeline_class_name if family else "StableDiffusionPipeline"
    family_tags = list(family.card_tags) if family else ["stable-diffusion", "stable-diffusion-diffusers"]
    meta = {"license": license}
    if hub_id:
        meta["base_model"] = hub_id
    meta.update({
        "library_name": "diffusers",
        "instance_prompt": data.instance_prompt,
        "tags": ["text-to-image", "diffusers", "lora", "dreambooth", "diffusers-training", "template:sd-lora",
                 *family_tags],
    })
    if grids:
        meta["widget"] = [{"text": run.validation.validation_prompt or data.instance_prompt,
                           "output": {"url": f"validation/{name}"}} for name in grids[-4:]]
    head = yaml.safe_dump(meta, sort_keys=False, allow_unicode=True, width=1000)
    where = pushed or output_dir
    base_text = f"[{hub_id}](https://huggingface.co/{hub_id})" if hub_id else f"`{model}` (a local model)"
    if hub_id and os.path.exists(model):
        base_text += f", loaded from `{model}`"
    sample = f"\n![validation](validation/{grids[-1]})\n" if grids else ""
    restrictions = USE_RESTRICTIONS.get(license, f"Use it under the terms of the base model's licence ({license}).")
    lora_name = os.path.splitext(os.path.basename(kohya_file))[0] if kohya_file else None
    trigger = (f"`{pivotal.prompt}` in diffusers (after loading the trained tokens, below), "
               f"`{pivotal.ui_prompt}` in AUTOMATIC1111 / ComfyUI: the trained tokens stand for "
               f"`{lora.token_abstraction}` in `{data.instance_prompt}`." if pivotal
               else f"Use `{data.instance_prompt}` in the prompt to get the subject.")
    a1111 = (f"""## Use it in AUTOMATIC1111 / Forge

Copy `{lora_name}.safetensors` into `stable-diffusion-webui/models/Lora/`, load {family.ui_base if family else 'the same'}
base checkpoint, and add `<lora:{lora_name}:1>` plus the trigger words to the prompt. The Lora tab lists it under
the base's version and offers the trigger words (from its metadata) as activation text.
""" if not family or family.a1111 else f"""AUTOMATIC1111 does not run {family.name} models; Forge and SD.Next read the same file as ComfyUI
does (its transformer keys are diffusers' module names, which they map onto their fused weights).
""")
    ui = (f"""## Use it in ComfyUI

Copy `{lora_name}.safetensors` into `ComfyUI/models/loras/`, add a **Load LoRA** node between the checkpoint loader
({base_text}) and the sampler, pick the file, and put the trigger words in the prompt.

{a1111}""" if kohya_file else """## ComfyUI / AUTOMATIC1111

This run wrote the diffusers file only (`--output_format diffusers`); train with `--output_format both` for the
kohya-layout file the UIs load.
""")
    body = f"""
# DreamBooth LoRA: {data.instance_prompt}

LoRA weights for {base_text}, trained with DreamBooth on `{data.dataset_name or data.instance_data_dir}` for {steps}
steps ({seconds / 60:.1f} min) on {datetime.date.today().isoformat()}.
{sample}
## Trigger words

{trigger}

## Licence

`{license}` (from {license_source}). {restrictions}

## Use it with diffusers

```python
import torch
{pivotal.imports if pivotal else ""}from diffusers import {pipeline}
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.{family.card_gpu_dtype if family else "float16"} if device == "cuda" else torch.float32  # one dtype for every part
pipe = {pipeline}.from_pretrained("{hub_id or model}", torch_dtype=dtype).to(device)
pipe.load_lora_weights("{where}")
{pivotal.load_code if pivotal else ""}image = pipe("{pivotal.prompt if pivotal else data.instance_prompt} in a bucket").images[0]
```
{pivotal.section if pivotal else ""}
{ui}
## Settings

| setting | value |
| --- | --- |
| instance prompt | `{data.instance_prompt}` |
| prior preservation | {prior_text(run.prior)} |
| resolution | {data.resolution} |
| rank / alpha | {lora.rank} / {lora.lora_alpha or lora.rank}{' (DoRA)' if lora.use_dora else ''} |
| learning rate | {opt.learning_rate} ({opt.lr_scheduler}){f'; text encoder / new tokens {opt.text_encoder_lr}'
                                                        if opt.text_encoder_lr else ''} |
| optimizer | {opt.optimizer} |
| pivotal tuning | {f'`{lora.token_abstraction}` -> {lora.num_new_tokens_per_abstraction} new token(s), embeddings trained for '
                    f'{lora.train_text_encoder_ti_frac:g} of the steps' if lora.train_text_encoder_ti else 'off'} |
| text encoder | {'LoRA-trained' if lora.train_text_encoder else 'frozen'} |
| objective | {objective_text(run.family_options, training)} |
| base weights | {base_weights_text(run.quantization, run.memory, record.mixed_precision)} |
| batch | {training.train_batch_size} x {training.gradient_accumulation_steps} accumulation |
| mixed precision | {record.mixed_precision or 'accelerate default'} |

## Reproduce

```
{command}
```
or `accelerate launch train_dreambooth_lora.py --config {os.path.join(output_dir, 'config.yaml')} --output_dir NEW_FOLDER`
(the same folder is refused: it holds this run).
"""
    return f"---\n{head}---\n{body}"
