"""The DreamBooth paper's evaluation (Ruiz et al. 2023, arXiv 2208.12242, section 4.1 and 4.3) for a LoRA.

For each of the paper's 25 prompts (one list for objects, one for live subjects), N images with fixed seeds;
then, against a folder of real photos of the subject:
  DINO    subject fidelity: mean cosine between DINO ViT-S/16 CLS embeddings of every generated image and every
          real photo (DINO, unlike CLIP, is trained to tell instances of one class apart);
  CLIP-I  the same with CLIP image embeddings;
  CLIP-T  prompt fidelity: mean cosine between each image's CLIP embedding and its prompt's, the prompt read
          without the identifier (CLIP has never seen "sks"; the paper's prompts name the class as well);
  PRES    prior preservation: DINO similarity of the class prompt's images ("a dog") to the real subject --
          lower is better: the class has not turned into the subject;
  DIV     diversity: mean pairwise DINO distance (1 - cosine) among the images of one prompt, averaged over
          prompts. The paper uses LPIPS, whose weights are not in transformers; DINO distance ranks the same
          failure (every seed giving the same picture).
A "real images" row (real photos against each other, as in the paper's Table 1) gives the ceiling.

Models come from the Hub by id or from local folders; the preprocessing (resize, centre crop, normalise) is
done with PIL and numpy from the model folder's preprocessor_config.json, or the published defaults, so
torchvision is not needed. torch/transformers/diffusers are imported inside functions: `evaluate.py --help`
does not load them.
"""
import glob
import json
import os
import re

from .errors import UsageError

# The paper's prompt lists (its dataset's prompts_and_classes.txt): {0} the identifier, {1} the class noun.
OBJECT_PROMPTS = [
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest", "a {0} {1} with a wheat field in the background",
    "a {0} {1} with a tree and autumn leaves in the background", "a {0} {1} with the Eiffel Tower in the background",
    "a {0} {1} floating on top of water", "a {0} {1} floating in an ocean of milk",
    "a {0} {1} on top of green grass with sunflowers around it", "a {0} {1} on top of a mirror",
    "a {0} {1} on top of the sidewalk in a crowded street", "a {0} {1} on top of a dirt road",
    "a {0} {1} on top of a white rug", "a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}",
    "a cube shaped {0} {1}",
]
LIVE_PROMPTS = [
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest", "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat",
    "a {0} {1} wearing a rainbow scarf", "a {0} {1} wearing a black top hat and a monocle",
    "a {0} {1} in a chef outfit", "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit",
    "a {0} {1} wearing pink glasses", "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit",
    "a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}",
]
# Classes the live-subject list is for (the paper's live subjects are dogs and cats; other animals read the same).
LIVE_CLASSES = {"dog", "cat", "puppy", "kitten", "animal", "pet", "person", "man", "woman", "boy", "girl", "child",
                "baby", "horse", "bird", "rabbit", "bunny", "hamster", "cow", "pig", "sheep", "goat", "fox", "bear",
                "monkey", "lion", "tiger", "parrot", "duck", "chicken"}
METRICS = ["DINO", "CLIP-I", "CLIP-T", "PRES", "DIV"]
ARROWS = {"DINO": "↑", "CLIP-I": "↑", "CLIP-T": "↑", "PRES": "↓", "DIV": "↑"}
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


def prompt_set_for(class_name, prompt_set="auto"):
    """'object' or 'live': the paper's rule is what the subject is; 'auto' decides by the class noun."""
    if prompt_set != "auto":
        return prompt_set
    return "live" if class_name.strip().lower().split()[-1] in LIVE_CLASSES else "object"


def paper_prompts(identifier, class_name, prompt_set="auto"):
    """The 25 prompts of the chosen list with the identifier and class filled in."""
    templates = LIVE_PROMPTS if prompt_set_for(class_name, prompt_set) == "live" else OBJECT_PROMPTS
    return [t.format(identifier, class_name) for t in templates]


def without_identifier(prompt, identifier):
    """The prompt CLIP-T compares against: the identifier word removed ('a sks dog' -> 'a dog')."""
    return re.sub(r"\s+", " ", re.sub(rf"\b{re.escape(identifier)}\b", "", prompt)).strip()


def find_checkpoints(run_dir):
    """[(name, lora_path, step)] for every checkpoint-N (in step order) plus the final LoRA of a run folder."""
    found = []
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*")):
        m = re.fullmatch(r"checkpoint-(\d+)", os.path.basename(path))
        if m and os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):
            found.append((os.path.basename(path), path, int(m.group(1))))
    found.sort(key=lambda x: x[2])
    if os.path.isfile(os.path.join(run_dir, "pytorch_lora_weights.safetensors")):
        found.append(("final", run_dir, None))
    return found


def real_images(folder):
    """The subject's photos as 8-bit RGB, read as the trainer reads its instance photos (images.load_rgb: 16-bit,
    float, transparent, CMYK and 1-bit files too, which a plain convert('RGB') turns white, black or negative)."""
    from .images import load_rgb

    if not os.path.isdir(folder):
        raise UsageError(f"--real_dir {folder}: no such folder; point it at the real photos of the subject")
    paths = sorted(p for p in glob.glob(os.path.join(folder, "*")) if p.lower().endswith(IMAGE_EXTS))
    if not paths:
        raise UsageError(f"--real_dir {folder}: no images (jpg/png/webp/bmp) in it; point it at the subject's photos")
    out = []
    for p in paths:
        try:
            out.append(load_rgb(p))
        except Exception as e:
            raise UsageError(f"--real_dir: {p} is not a readable image ({type(e).__name__}); remove or replace it") from e
    return out


# ---------------------------------------------------------------- embedders


def _preprocess_config(folder, defaults):
    """image_mean/std and sizes from the model folder's preprocessor_config.json when it has one."""
    cfg = dict(defaults)
    path = os.path.join(folder, "preprocessor_config.json") if os.path.isdir(folder) else None
    if path is None:
        try:
            from huggingface_hub import hf_hub_download
            path = hf_hub_download(folder, "preprocessor_config.json")
        except Exception:
            path = None
    if path and os.path.isfile(path):
        with open(path) as f:
            raw = json.load(f)
        for key in ("image_mean", "image_std"):
            if key in raw:
                cfg[key] = raw[key]
        crop = raw.get("crop_size")
        if isinstance(crop, dict):
            crop = crop.get("height") or crop.get("width")
        if crop:
            cfg["crop"] = int(crop)
        size = raw.get("size")
        if isinstance(size, dict):
            size = size.get("shortest_edge") or size.get("height")
        if size:
            cfg["resize"] = int(size)
    return cfg


def to_pixels(images, resize, crop, mean, std):
    """PIL -> normalised float tensor: shorter side to `resize` (bicubic), centre crop `crop`, (x - mean) / std."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for im in images:
        w, h = im.size
        s = resize / min(w, h)
        im = im.convert("RGB").resize((max(crop, round(w * s)), max(crop, round(h * s))), Image.BICUBIC)
        left, top = (im.width - crop) // 2, (im.height - crop) // 2
        arr = np.asarray(im.crop((left, top, left + crop, top + crop)), dtype=np.float32) / 255.0
        out.append((arr - np.array(mean, dtype=np.float32)) / np.array(std, dtype=np.float32))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


def _load(flag, model, loader):
    from .families import load_error
    try:
        return loader()
    except UsageError:
        raise
    except Exception as e:
        raise UsageError(load_error(model, "weights", e, flag)) from e


def _embed_images(images, batch_size, cfg, device, forward):
    """L2-normalised embeddings of PIL images, in batches, with a model's own resize/crop/normalisation."""
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            px = to_pixels(images[i:i + batch_size], cfg["resize"], cfg["crop"], cfg["image_mean"], cfg["image_std"])
            out.append(forward(px.to(device)).float().cpu())
    return torch.nn.functional.normalize(torch.cat(out), dim=-1)


class Dino:
    """DINO ViT CLS embeddings (the paper: ViT-S/16, facebook/dino-vits16), L2-normalised."""

    def __init__(self, model, device):
        from transformers import ViTModel
        self.net = _load("--dino_model", model, lambda: ViTModel.from_pretrained(model, add_pooling_layer=False))
        self.net.to(device).eval()
        self.device = device
        crop = self.net.config.image_size
        self.cfg = _preprocess_config(model, {"image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225],
                                              "crop": crop, "resize": round(crop * 256 / 224)})

    def images(self, images, batch_size):
        return _embed_images(images, batch_size, self.cfg, self.device,
                             lambda px: self.net(pixel_values=px).last_hidden_state[:, 0])


class Clip:
    """CLIP image and text embeddings (projected, L2-normalised)."""

    def __init__(self, model, device):
        from transformers import AutoTokenizer, CLIPModel
        self.net = _load("--clip_model", model, lambda: CLIPModel.from_pretrained(model))
        self.tokenizer = _load("--clip_model", model, lambda: AutoTokenizer.from_pretrained(model))
        self.net.to(device).eval()
        self.device = device
        crop = self.net.config.vision_config.image_size
        self.cfg = _preprocess_config(model, {"image_mean": [0.48145466, 0.4578275, 0.40821073],
                                              "image_std": [0.26862954, 0.26130258, 0.27577711],
                                              "crop": crop, "resize": crop})

    @staticmethod
    def _tensor(out):
        import torch
        return out if torch.is_tensor(out) else out.pooler_output  # transformers 5 returns an output object

    def images(self, images, batch_size):
        return _embed_images(images, batch_size, self.cfg, self.device,
                             lambda px: self._tensor(self.net.get_image_features(pixel_values=px)))

    def texts(self, texts):
        import torch
        max_len = min(self.tokenizer.model_max_length, self.net.config.text_config.max_position_embeddings)
        tok = self.tokenizer(list(texts), padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        with torch.no_grad():
            out = self._tensor(self.net.get_text_features(**{k: v.to(self.device) for k, v in tok.items()}))
        return torch.nn.functional.normalize(out.float().cpu(), dim=-1)


# ---------------------------------------------------------------- generation


def make_pipeline(base, device, dtype):
    """The base pipeline of the model's family (detected from its files; a hub id's class comes from its
    model_index.json), with the family's sampler (DPM-Solver++ for the UNets, the flow-matching Euler for SD 3)."""
    import torch
    from diffusers import DiffusionPipeline
    from .families import ModelSource, detect, family_of_pipeline

    def load():
        if not os.path.exists(base):
            return DiffusionPipeline.from_pretrained(base, torch_dtype=dtype, safety_checker=None,
                                                     requires_safety_checker=False)
        family = detect(ModelSource(base), flag="--base")
        kwargs = dict(family.single_file_extras, torch_dtype=dtype, **family.from_pretrained_extras(base))
        if os.path.isfile(base):
            return family.pipeline_class().from_single_file(base, **kwargs)
        return family.pipeline_class().from_pretrained(base, **kwargs)

    pipe = _load("--base", base, load)
    pipe.scheduler = family_of_pipeline(pipe).sampling_scheduler(pipe.scheduler.config)  # DPM++ / flow Euler
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))


def generate(pipe, prompts, seeds, steps, guidance, resolution, batch_size, progress=None, nan_cause=None):
    """One image per (prompt, seed); each image has its own generator, so an image depends only on its prompt
    and seed, not on the batch it fell in: two LoRAs (or checkpoints) are compared on the same noise. Made as
    numbers first: diffusers saves NaN pixels as black without a word, and black images would be scored as real
    ones; nan_cause says which flag to blame."""
    import numpy as np
    import torch
    from .devices import out_of_memory
    images = []
    for i in range(0, len(prompts), batch_size):
        gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[i:i + batch_size]]
        try:
            batch = pipe(list(prompts[i:i + batch_size]), generator=gens, num_inference_steps=steps,
                         guidance_scale=guidance, height=resolution, width=resolution, output_type="np").images
        except Exception as e:
            if out_of_memory(e):
                raise UsageError(f"out of memory making {len(gens)} images of {resolution}x{resolution} at once; lower "
                                 "--batch_size or --resolution, or use --dtype fp16 on a GPU") from e
            raise
        if not np.isfinite(batch).all():
            raise UsageError(f"the images of \"{prompts[i]}\" came out as NaN (not-a-number pixels, which diffusers "
                             f"would save as black squares); {nan_cause or 'the model overflows'}; nothing was written")
        images += pipe.image_processor.numpy_to_pil(batch)
        if progress is not None:
            progress.update(len(gens))
    return images


def nan_cause(args, lora):
    """The flag most likely to have made a model's images NaN, and its fix."""
    if abs(args.guidance_scale) > 30:
        return f"--guidance_scale {args.guidance_scale:g} amplifies the prompt's push past the number range; use 1-15"
    if args.dtype == "fp16":
        return "--dtype fp16 overflowed (some models do in half precision); use --dtype bf16 or fp32"
    if lora:
        return f"--lora {lora} overflows this base (a diverged run?); score an earlier checkpoint-N of it"
    return "--base gives non-finite numbers (a corrupt or badly converted copy?); download or convert it again"


def check_loras(args, targets):
    """The LoRAs to score, checked before any model loads: an embeddings file given as the LoRA, a pivotal LoRA
    without its embeddings file (pivotal.lora_embeddings), and a pivotal run's subject word, which the prompts
    must use as the identifier, or the trained tokens would never be asked for."""
    from . import pivotal
    from .lora_loading import check_lora_file
    for _, lora, _ in targets:
        if lora is None:
            continue
        if os.path.isdir(lora) and not any(n.endswith(".safetensors") and not n.endswith(pivotal.EMB_SUFFIX)
                                           for n in os.listdir(lora)):
            raise UsageError(f"--lora {lora}: folder has no LoRA .safetensors file; give a training output folder, "
                             "a checkpoint-N folder or a .safetensors LoRA")
        check_lora_file(lora)
        path = pivotal.lora_embeddings(lora, "--lora")
        words = list(pivotal.read_token_map(path)) if path else []
        if words and args.identifier not in words:
            raise UsageError(f"--identifier {args.identifier}: --lora {lora} was trained with pivotal tuning, and its "
                             f"subject's word is {' or '.join(words)}; give --identifier {words[0]}")


# ---------------------------------------------------------------- metrics


def mean_cross(a, b):
    return float((a @ b.T).mean())


def mean_pairwise(a):
    """Mean cosine over distinct pairs (the diagonal, 1.0, left out)."""
    n = a.shape[0]
    if n < 2:
        return None
    sims = a @ a.T
    return float((sims.sum() - sims.diagonal().sum()) / (n * (n - 1)))


def metrics(dino, clip, real, images, prompts, class_images, num_images, identifier, batch_size):
    """The paper's numbers for one model's images (images in prompt order, num_images each)."""
    g_dino = dino.images(images, batch_size)
    g_clip = clip.images(images, batch_size)
    texts = clip.texts([without_identifier(p, identifier) for p in prompts])
    out = {"DINO": mean_cross(g_dino, real["dino"]), "CLIP-I": mean_cross(g_clip, real["clip"])}
    per_prompt, clip_t, div = [], [], []
    for k, p in enumerate(prompts):
        sl = slice(k * num_images, (k + 1) * num_images)
        t = float((g_clip[sl] @ texts[k]).mean())
        pair = mean_pairwise(g_dino[sl])
        clip_t.append(t)
        if pair is not None:
            div.append(1.0 - pair)
        per_prompt.append({"prompt": p, "DINO": mean_cross(g_dino[sl], real["dino"]),
                           "CLIP-I": mean_cross(g_clip[sl], real["clip"]), "CLIP-T": t,
                           "DIV": None if pair is None else 1.0 - pair})
    out["CLIP-T"] = sum(clip_t) / len(clip_t)
    out["DIV"] = sum(div) / len(div) if div else None
    out["PRES"] = mean_cross(dino.images(class_images, batch_size), real["dino"]) if class_images else None
    out["per_prompt"] = per_prompt
    return out


def format_table(rows):
    """The paper's table layout: one row per model (or checkpoint), DINO / CLIP-I / CLIP-T, then PRES / DIV."""
    header = "| model | " + " | ".join(f"{m} {ARROWS[m]}" for m in METRICS) + " |"
    lines = [header, "|" + "---|" * (len(METRICS) + 1)]
    for r in rows:
        cells = ["—" if r.get(m) is None else f"{r[m]:.3f}" for m in METRICS]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contact_sheet(rows, path, thumb=96, label=12):
    """rows: [(caption, [images])]; one row of thumbnails per caption, the caption written under it; saved to path
    (atomically: a reader never sees half a sheet)."""
    from .files import atomic_write
    sheet = contact_sheet_image(rows, thumb, label)
    atomic_write(path, lambda tmp: sheet.save(tmp, format="PNG"))
    return path


def contact_sheet_image(rows, thumb=96, label=12):
    from PIL import Image, ImageDraw

    cols = max(1, max(len(ims) for _, ims in rows))
    sheet = Image.new("RGB", (cols * thumb, len(rows) * (thumb + label)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (caption, ims) in enumerate(rows):
        y = r * (thumb + label)
        for c, im in enumerate(ims):
            sheet.paste(im.convert("RGB").resize((thumb, thumb), Image.BICUBIC), (c * thumb, y))
        draw.text((2, y + thumb), caption[: cols * thumb // 6], fill=(0, 0, 0))
    return sheet


def evaluate(args, log=print):
    """Run the protocol for args (see evaluate.py) and write metrics.json + contact sheets to args.output."""
    import torch
    from tqdm.auto import tqdm

    from . import pivotal
    from .lora_loading import load_embeddings, load_lora
    if args.checkpoints:
        if not args.lora or not os.path.isdir(args.lora):
            raise UsageError("--checkpoints needs --lora to be a training output folder (the one holding checkpoint-N)")
        targets = find_checkpoints(args.lora)
        if not targets:
            raise UsageError(f"--lora {args.lora}: no checkpoint-N folder and no pytorch_lora_weights.safetensors in "
                             "it; point it at a training --output_dir")
    elif args.lora:
        if not os.path.exists(args.lora):
            raise UsageError(f"--lora {args.lora}: no such file or folder; give a training output folder, a "
                             "checkpoint-N folder or a .safetensors LoRA")
        targets = [(os.path.basename(os.path.normpath(args.lora)) or "lora", args.lora, None)]
    else:
        targets = []
    if args.with_base or not targets:
        targets = [("base", None, None)] + targets
    check_loras(args, targets)
    real = real_images(args.real_dir)
    prompts = paper_prompts(args.identifier, args.class_name, args.prompt_set)[: args.num_prompts or None]
    class_prompt = args.class_prompt or f"a {args.class_name}"
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    from .files import atomic_write, writable_folder_problem, write_text
    problem = writable_folder_problem(args.output)
    if problem or os.path.isfile(args.output):
        raise UsageError(f"--output {args.output}: {problem or 'is a file'}; choose another folder")

    dino = Dino(args.dino_model, args.eval_device)
    clip = Clip(args.clip_model, args.eval_device)
    real_emb = {"dino": dino.images(real, args.batch_size), "clip": clip.images(real, args.batch_size)}
    pipe = make_pipeline(args.base, args.device, dtype)
    from .families import family_of_pipeline
    family = family_of_pipeline(pipe)
    resolution = args.resolution or family.default_size(pipe)
    multiple = family.sampling_size_multiple(pipe)
    if resolution % multiple:
        raise UsageError(f"--resolution {resolution}: {family.name} makes images whose sides are multiples of "
                         f"{multiple}; give {resolution // multiple * multiple or multiple} or "
                         f"{(resolution // multiple + 1) * multiple}")
    steps, guidance = family.inference_defaults(pipe)
    args.steps = args.steps or steps  # what ran, for metrics.json
    problem = family.sampling_flag_problem(pipe, None, args.guidance_scale, guidance)
    if problem:
        raise UsageError(problem)
    args.guidance_scale = guidance if args.guidance_scale is None else args.guidance_scale
    limit = pipe.scheduler.config.get("num_train_timesteps") or 1000
    if args.steps > limit:
        raise UsageError(f"--steps {args.steps}: more than the {limit} noise levels the model was trained on; give at "
                         f"most {limit} (the family's default, {steps}, is usually enough)")

    gen_prompts = [p for p in prompts for _ in range(args.num_images)]
    gen_seeds = [args.seed + k for _ in prompts for k in range(args.num_images)]
    cls_prompts = [class_prompt] * args.num_class_images
    cls_seeds = [args.seed + k for k in range(args.num_class_images)]
    results = [{"name": "real images", "DINO": mean_pairwise(real_emb["dino"]), "CLIP-I": mean_pairwise(real_emb["clip"]),
                "CLIP-T": None, "PRES": None, "DIV": None}]
    total = len(targets) * (len(gen_prompts) + len(cls_prompts))
    sheets = []
    with tqdm(total=total, desc="images", unit="img", disable=args.no_progress) as bar:
        for name, lora, step in targets:
            mapping = {}
            if lora is not None:  # as infer.py loads it: one line for a LoRA that is unreadable or for another base
                mapping = load_lora(pipe, lora, "lora", args.base, "evaluate.py")  # and embeddings bundled in it
                mapping.update(load_embeddings(pipe, lora))  # its trained tokens, under names no earlier target took
            cause = nan_cause(args, lora)
            images = generate(pipe, [pivotal.rewrite(p, mapping) for p in gen_prompts], gen_seeds, args.steps,
                              args.guidance_scale, resolution, args.batch_size, bar, cause)
            class_images = generate(pipe, cls_prompts, cls_seeds, args.steps, args.guidance_scale, resolution,
                                    args.batch_size, bar, cause) if cls_prompts else []
            if lora is not None:
                pipe.unload_lora_weights()
            row = metrics(dino, clip, real_emb, images, prompts, class_images, args.num_images, args.identifier,
                          args.batch_size)
            n = args.num_images
            sheet_rows = [(p, images[k * n:(k + 1) * n]) for k, p in enumerate(prompts)]
            sheet_rows += [(class_prompt, class_images[i:i + n]) for i in range(0, len(class_images), n)]
            sheet = os.path.join(args.output, f"contact_sheet_{name}.png")
            sheets.append((contact_sheet_image(sheet_rows), sheet))  # thumbnails only are kept
            results.append({"name": name, "lora": lora, "step": step, **row, "contact_sheet": sheet})
    # written only now, every model scored: a bad LoRA or NaN images halfway leave an earlier evaluation's files
    # in --output as they were, not half replaced
    for image, sheet in sheets:
        atomic_write(sheet, lambda tmp: image.save(tmp, format="PNG"))
    table = format_table(results)
    settings = {k: getattr(args, k) for k in ("base", "lora", "checkpoints", "real_dir", "identifier", "class_name",
                                              "class_prompt", "prompt_set", "num_images", "num_class_images",
                                              "num_prompts", "seed", "steps", "guidance_scale", "dino_model",
                                              "clip_model")}
    settings.update({"prompt_list": prompt_set_for(args.class_name, args.prompt_set), "resolution": resolution,
                     "prompts": prompts, "class_prompt": class_prompt, "real_images": len(real)})
    write_text(os.path.join(args.output, "metrics.json"),
               json.dumps({"settings": settings, "results": results, "table": table}, indent=1))
    log(table)
    log(f"wrote {os.path.join(args.output, 'metrics.json')} and {len(targets)} contact sheet(s) to {args.output}")
    return results
