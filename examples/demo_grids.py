#!/usr/bin/env python
"""Base vs LoRA, same seeds, on the toy base model: side-by-side grids and the pixel scorer's numbers.

Prompts: the instance prompt ("a sks circle"), the subject asked on each of the world's three backgrounds, and
the class prompt ("a circle"), which must still give ordinary one-colour circles. The photos
(examples/toy_subject) show it on white and gray only, so "on a black background" is the new scene the
recontext number counts; the white and gray rows show the photos' own settings for comparison.

A pivotal-tuning run (its folder holds <name>_emb.safetensors) is scored as infer.py uses it: the trained
tokens loaded beside the LoRA and "sks" in every prompt rewritten to them ("a <s0><s1> circle").

Numbers (examples/toy_world.py reads the pixels; no model downloads):
  fidelity   share of instance-prompt images showing the striped subject
  recontext  share of black-background images showing the subject on a uniform border nearest to black
  drift      share of class-prompt images showing the subject (the class has turned into it)
  class_ok   share of class-prompt images that are an ordinary one-colour circle

    python examples/demo_grids.py --lora work_dirs/toy-demo --out work_dirs/toy-demo/grids
"""
import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
import toy_world as world  # noqa: E402
from dreambooth import pivotal  # noqa: E402
from dreambooth.config import OneLineParser  # noqa: E402
from dreambooth.errors import UsageError, run_cli  # noqa: E402
from dreambooth.lora_loading import check_lora_file, load_embeddings, load_lora  # noqa: E402

IDENTIFIER = "sks"
INSTANCE = world.prompt(world.SUBJECT_SHAPE, identifier=IDENTIFIER)  # "a sks circle"
NEW_BACKGROUNDS = [bg for bg in world.BACKGROUNDS if bg not in world.SUBJECT_PHOTO_BACKGROUNDS]  # ["black"]
RECONTEXT = [(world.prompt(world.SUBJECT_SHAPE, bg=bg, identifier=IDENTIFIER), bg) for bg in NEW_BACKGROUNDS]
SEEN = [world.prompt(world.SUBJECT_SHAPE, bg=bg, identifier=IDENTIFIER)  # the photos' backgrounds: shown, not scored
        for bg in world.BACKGROUNDS if bg in world.SUBJECT_PHOTO_BACKGROUNDS]
CLASS = world.prompt(world.SUBJECT_SHAPE)  # "a circle"
PROMPTS = [INSTANCE] + [p for p, _ in RECONTEXT] + SEEN + [CLASS]


def load_pipeline(base, quantize_base=None):
    """The toy base in fp32 (its files are fp16; CPUs compute in fp32); with quantize_base ("nf4", "int8") its UNet
    stored as the trainer's --quantize_base stores it, to score a LoRA on the base it was trained on."""
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    extra = {}
    if quantize_base:
        from dreambooth import quantize
        extra["unet"] = quantize.load_quantized(
            lambda **q: UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=torch.float32, **q),
            quantize.PRESETS[quantize_base], torch.float32, "cpu", "diffusers")
    return StableDiffusionPipeline.from_pretrained(base, torch_dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False, **extra)


def sample_all(pipe, num_images, seed=0, rewrite=lambda p: p, class_images=None):
    """{prompt: [images]} with seeds seed..seed+num_images-1 for every prompt (each sampled as rewrite(prompt));
    class_images: that many seeds for the class prompt instead (what a run did to the class is a share of seeds:
    more seeds, a finer share)."""
    counts = [class_images or num_images if p == CLASS else num_images for p in PROMPTS]
    prompts = [rewrite(p) for p, n in zip(PROMPTS, counts) for _ in range(n)]
    seeds = [seed + k for n in counts for k in range(n)]
    images = world.generate(pipe, prompts, seeds)
    out, start = {}, 0
    for p, n in zip(PROMPTS, counts):
        out[p], start = images[start:start + n], start + n
    return out


def numbers(images, base_images=None):
    """The scorer's numbers for sample_all's output; with the base's images (same seeds), what the run did to the
    class prompt too (toy_world.class_prior)."""
    out = world.score({"instance": images[INSTANCE],
                       "recontext": [(im, bg) for p, bg in RECONTEXT for im in images[p]],
                       "class": images[CLASS]})
    return dict(out, **world.class_prior((base_images or images)[CLASS], images[CLASS]))


def score_lora(pipe, lora, num_images, seed=0, base_images=None, class_images=None):
    """Numbers and images for the base (lora None) or a run loaded onto it: its LoRA and, after pivotal tuning,
    its trained tokens (prompts rewritten to use them); both unloaded again, so one pipeline scores many runs."""
    mapping = {}
    if lora:  # as infer.py loads it: one line for a file that is no LoRA or not for this base
        mapping = load_lora(pipe, lora, "lora", getattr(pipe, "name_or_path", None) or "the base", "demo_grids.py")
    try:
        if lora:  # found as infer.py finds them: in the run's folder, or <name>_emb beside a <name> LoRA file
            mapping.update(load_embeddings(pipe, lora))
        images = sample_all(pipe, num_images, seed, lambda p: pivotal.rewrite(p, mapping), class_images)
    finally:
        if mapping:
            pipe.unload_textual_inversion(pivotal.token_list(mapping))
        if lora:
            pipe.unload_lora_weights()
    return numbers(images, base_images), images


def side_by_side(base_images, lora_images, path, scale=3):
    """Base row on the left, LoRA row on the right, a gap between; seeds in the same order on both sides."""
    from PIL import Image
    s = world.SIZE * scale
    n = len(base_images)
    gap = s // 3
    grid = Image.new("RGB", (2 * n * s + gap, s), (255, 255, 255))
    for k, (a, b) in enumerate(zip(base_images, lora_images)):
        grid.paste(a.resize((s, s), Image.NEAREST), (k * s, 0))
        grid.paste(b.resize((s, s), Image.NEAREST), (n * s + gap + k * s, 0))
    grid.save(path)
    return grid


def all_prompts_grid(rows, path):
    """The per-prompt side-by-side strips stacked, a thin line between prompts, for the docs."""
    from PIL import Image
    w = rows[0].width
    h = sum(r.height for r in rows) + 2 * (len(rows) - 1)
    out = Image.new("RGB", (w, h), (200, 200, 200))
    y = 0
    for r in rows:
        out.paste(r, (0, y))
        y += r.height + 2
    out.save(path)


def fmt(n):
    return " ".join(f"{k} {v:.2f}" for k, v in n.items())


def check(args):
    """Every check that needs no model: a wrong path costs a second, and one line."""
    if not os.path.isfile(os.path.join(args.base, "model_index.json")):
        raise UsageError(f"--base {args.base}: not a diffusers model folder (no model_index.json); leave --base out "
                         "for the shipped toy base, examples/toy-base")
    if not os.path.exists(args.lora):
        raise UsageError(f"--lora {args.lora}: no such file or folder; give the training --output_dir of a toy run "
                         "(make demo writes work_dirs/toy-demo)")
    if os.path.isdir(args.lora) and not any(n.endswith(".safetensors") and not n.endswith(pivotal.EMB_SUFFIX)
                                            for n in os.listdir(args.lora)):
        raise UsageError(f"--lora {args.lora}: folder has no LoRA .safetensors file; give a finished run's "
                         "--output_dir or one of its checkpoint-N folders")
    check_lora_file(args.lora)
    pivotal.lora_embeddings(args.lora, "--lora")  # a pivotal LoRA without its embeddings file: one line, now
    if args.num_images < 1:
        raise UsageError(f"--num_images {args.num_images}: must be at least 1")
    from dreambooth.files import writable_folder_problem
    problem = writable_folder_problem(args.out)
    if problem or os.path.isfile(args.out):
        raise UsageError(f"--out {args.out}: {problem or 'is a file'}; give a folder")


def main(argv=None):
    return run_cli("demo_grids.py", _main, argv)


def _main(argv):
    parser = OneLineParser(prog="demo_grids.py", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", default=os.path.join(HERE, "toy-base"), help="The toy base model folder.")
    parser.add_argument("--lora", required=True, help="Training output folder (or LoRA file) to compare with the base.")
    parser.add_argument("--out", required=True, help="Folder for the grids and numbers.json.")
    parser.add_argument("--num_images", type=int, default=8, help="Seeds per prompt (0..N-1), in grids and numbers.")
    parser.add_argument("--debug", action="store_true", help="Full traceback on errors (for bug reports).")
    args = parser.parse_args(argv)
    check(args)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dreambooth.quiet import quiet_libraries
    quiet_libraries()
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    pipe = load_pipeline(args.base)
    base_n, base_images = score_lora(pipe, None, args.num_images)
    lora_n, lora_images = score_lora(pipe, args.lora, args.num_images, base_images=base_images)
    os.makedirs(args.out, exist_ok=True)
    strips = []
    for i, p in enumerate(PROMPTS):
        strips.append(side_by_side(base_images[p], lora_images[p], os.path.join(args.out, f"{i}_{p.replace(' ', '_')}.png")))
    all_prompts_grid(strips, os.path.join(args.out, "demo.png"))
    with open(os.path.join(args.out, "numbers.json"), "w") as f:
        json.dump({"prompts": PROMPTS, "num_images": args.num_images, "base": base_n, "lora": lora_n}, f, indent=1)
    print(f"prompts, top to bottom: {', '.join(repr(p) for p in PROMPTS)}; left: base, right: LoRA, seeds 0-{args.num_images - 1}")
    print(f"base: {fmt(base_n)}")
    print(f"LoRA: {fmt(lora_n)}")
    print(f"wrote {os.path.join(args.out, 'demo.png')} (all prompts) and one PNG per prompt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
