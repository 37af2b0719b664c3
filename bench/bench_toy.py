#!/usr/bin/env python
"""What a run learns, measured on the toy world: the base, then the recommended recipe
(examples/recipes/toy_demo.yaml: pivotal tuning + UNet LoRA at 2.5e-3, prior preservation from the base's own
output, captions that name the background, 150 steps, the new tokens at 2e-2) against what each of its choices
buys: no prior preservation, class images instead, diffusers' settings, a text-encoder LoRA instead of new tokens,
the tokens at the LoRA's rate, training longer, photos on one background only, photos without captions, Prodigy,
a quantized base, an EMA, caption dropout.

Each LoRA trains on the striped circle (examples/toy_subject: 5 photos on white and gray, captioned) from
examples/toy-base (the trainer, as a user runs it), then the pixel scorer (examples/toy_world.py, through
examples/demo_grids.py) reads --num_images images per prompt, seeds 0..N-1, the same for every row: fidelity
("a sks circle" shows the striped subject), recontext (on a uniform border nearest to black, a scene no photo shows),
drift (class prompt "a circle" shows the subject), class_ok (an ordinary one-colour circle), and what the run did
to the class prompt against the base, seed by seed: class prior changed (share of seeds whose colour or background
moved) and the colours and backgrounds its class images show (the base's are the first row's). Pivotal runs
are scored with their tokens loaded and "sks" rewritten, as infer.py does. Wall time is the training command's
(class images are cached by settings: a run that had to generate them is marked; --fresh_class_images makes every
class-image run generate its own, as a first run does). --seeds trains every row
with several training seeds and prints their mean (the toy's few photos make single runs noisy).

    nice -n 19 python bench/bench_toy.py --num_images 8 --seeds 0,1,2   # ~20 min on 2 CPU cores (docs/quality.md's table)
    nice -n 19 python bench/bench_toy.py --only 1,7,8                   # one seed: the recipe against its photos' variants
    nice -n 19 python bench/bench_toy.py --seeds 0,1,2,3,4 --only 1,2,12,15,16 --fresh_class_images  # the prior's table
"""
import argparse
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

RECIPE = os.path.join(ROOT, "examples", "recipes", "toy_demo.yaml")
NO_PIVOTAL = ["--no-train_text_encoder_ti"]
CLASS_IMAGES = ["--prior_preservation_mode", "images", "--num_class_images", "50", "--sample_batch_size", "25",
                "--class_data_dir", os.path.join(ROOT, "work_dirs", "toy-class-images")]
# Rows: name -> (flags on top of the recipe, the photos: "photos" = examples/toy_subject, or a variant of it that
# the bench writes: "white_only" = the same 5 photos all on white, "no_captions" = without the caption files).
VARIANTS = {
    "recommended (toy_demo.yaml)": ([], "photos"),
    "no prior preservation": (["--no-with_prior_preservation", "--prior_preservation_mode", "images"], "photos"),
    "diffusers' settings (UNet LoRA rank 4, 5e-4, 400 steps, no captions)":
        (NO_PIVOTAL + ["--learning_rate", "5e-4", "--rank", "4", "--max_train_steps", "400"], "no_captions"),
    # The recipe's --text_encoder_lr 2e-2 is for the new tokens' rows; a text-encoder LoRA trains at the LoRA's rate.
    "text-encoder LoRA instead of pivotal tuning": (NO_PIVOTAL + ["--train_text_encoder", "--text_encoder_lr",
                                                                  "2.5e-3"], "photos"),
    "new tokens at the LoRA's rate (--text_encoder_lr 2.5e-3)": (["--text_encoder_lr", "2.5e-3"], "photos"),
    "400 steps instead of 150": (["--max_train_steps", "400"], "photos"),
    "photos all on white": ([], "white_only"),
    "photos without captions": ([], "no_captions"),
    "Prodigy, --learning_rate 1.0": (["--optimizer", "prodigy", "--learning_rate", "1.0"], "photos"),
    # QLoRA: the frozen UNet's linear layers in 4 / 8 bits; scored, like every row, on the full-precision base
    "NF4 base (--quantize_base nf4)": (["--quantize_base", "nf4"], "photos"),
    "int8 base (--quantize_base int8)": (["--quantize_base", "int8"], "photos"),
    # DreamBooth's own prior preservation: 50 class images drawn by the base (cached in work_dirs/toy-class-images
    # unless --fresh_class_images), at the recipe's rate and at the rate the recipe had with them until 2026-12-08
    "class images instead (--prior_preservation_mode images, 50 images)": (CLASS_IMAGES, "photos"),
    "EMA of the LoRA (--use_ema, decay 0.99)": (["--use_ema", "--ema_decay", "0.99"], "photos"),
    "caption dropout 0.1 (--caption_dropout_rate 0.1)": (["--caption_dropout_rate", "0.1"], "photos"),
    "class images at --learning_rate 5e-3 (the recipe until 2026-12-08)": (CLASS_IMAGES + ["--learning_rate", "5e-3"],
                                                                          "photos"),
    "base output at --learning_rate 5e-3": (["--learning_rate", "5e-3"], "photos"),
}
RECIPE_ROW, QUANTIZED_ROWS = 1, (10, 11)  # compared image by image below the table, when run together


def photos(kind, out):
    """The instance folder for a row."""
    import toy_world as world
    if kind == "photos":
        return os.path.join(ROOT, "examples", "toy_subject")
    folder = os.path.join(out, kind)
    shutil.rmtree(folder, ignore_errors=True)  # written anew: cheap, and never a stale or half-written set
    if kind == "white_only":
        world.write_subject_images(folder, backgrounds=("white",) * len(world.SUBJECT_PHOTO_BACKGROUNDS))
    else:
        world.write_subject_images(folder, captions=False)
    return folder


def train(name, flags, out, log, model):
    cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"), "--config", RECIPE, "--output_dir", out,
           "--overwrite_output_dir", "--report_to", "none", "--pretrained_model_name_or_path", model, *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    t0 = time.time()
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    with open(log, "a") as f:
        f.write(f"### {name}\n{' '.join(cmd)}\n{r.stdout}\n{r.stderr}\n")
    if r.returncode != 0:
        sys.exit(f"{name}: training failed (exit {r.returncode}); see {log}")
    import re
    m = re.search(r"\((\d+) generated", r.stdout + r.stderr)
    return wall, bool(m and int(m.group(1)) > 0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_images", type=int, default=8, help="Seeds per prompt for the scorer.")
    parser.add_argument("--class_images", type=int, default=32,
                        help="Seeds for the class prompt (the class prior's share of seeds changed, its variety).")
    parser.add_argument("--fresh_class_images", action="store_true",
                        help="Each image-based run generates its class images anew (a new class folder), so its "
                             "wall time includes them, as a user's first run pays for them.")
    parser.add_argument("--seeds", default="0", help="Comma-separated training seeds; several: each row's mean.")
    parser.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "bench_toy"), help="Runs and logs go here.")
    parser.add_argument("--only", default=None,
                        help=f"Comma-separated row numbers (1-{len(VARIANTS)}) to run (default: all), e.g. 1,7,8 "
                             "for the recipe against its photos' variants.")
    parser.add_argument("--model", default=os.path.join(ROOT, "examples", "toy-base"),
                        help="The pretrained toy base to train and score on (default: examples/toy-base).")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from dreambooth.quiet import quiet_libraries
    quiet_libraries()
    import torch

    import demo_grids
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    os.makedirs(args.out, exist_ok=True)
    log = os.path.join(args.out, "train.log")
    open(log, "w").close()
    seeds = [int(x) for x in args.seeds.split(",")]
    pipe = demo_grids.load_pipeline(args.model)
    base_scores, base_images = demo_grids.score_lora(pipe, None, args.num_images, class_images=args.class_images)
    rows = [("base model (no training)", base_scores, None)]
    chosen = set(int(x) for x in args.only.split(",")) if args.only else None
    first_images = {0: base_images}  # row -> its first seed's images
    quantized_pipes = {}  # "nf4"/"int8" -> the toy base with its UNet stored so
    for i, (name, (flags, kind)) in enumerate(VARIANTS.items(), 1):
        if chosen and i not in chosen:
            continue
        runs, instance_dir = [], photos(kind, args.out)  # written once per row, shared by its seeds
        for seed in seeds:
            out = os.path.join(args.out, f"run{i}-seed{seed}")
            fresh = []
            if args.fresh_class_images and "images" in flags:
                fresh = ["--class_data_dir", os.path.join(args.out, f"class-images-run{i}-seed{seed}")]
                shutil.rmtree(fresh[1], ignore_errors=True)
            wall, generated = train(name, flags + ["--seed", str(seed), "--instance_data_dir", instance_dir] + fresh,
                                    out, log, args.model)
            scores, images = demo_grids.score_lora(pipe, out, args.num_images, base_images=base_images,
                                                   class_images=args.class_images)
            if "--quantize_base" in flags:  # also on the quantized base it trained on (the LoRA as trained)
                kind = flags[flags.index("--quantize_base") + 1]
                if kind not in quantized_pipes:
                    quantized_pipes[kind] = demo_grids.load_pipeline(args.model, kind)
                as_trained = demo_grids.score_lora(quantized_pipes[kind], out, args.num_images, base_images=base_images,
                                                   class_images=args.class_images)
                scores = dict(scores, fidelity_on_quantized_base=as_trained[0]["fidelity"],
                              recontext_on_quantized_base=as_trained[0]["recontext"])
            runs.append((scores, wall, generated))
            if seed == seeds[0]:
                first_images[i] = images
            print(f"{name}, seed {seed}: {demo_grids.fmt(runs[-1][0])} in {wall:.0f}s", file=sys.stderr, flush=True)
        mean = {k: sum(r[0][k] for r in runs) / len(runs) for k in runs[0][0]}
        if "fidelity_on_quantized_base" in mean:
            print(f"{name}: on the quantized base it trained on: fidelity {mean['fidelity_on_quantized_base']:.2f}, "
                  f"recontext {mean['recontext_on_quantized_base']:.2f} (mean of the seeds)", flush=True)
        wall = sum(r[1] for r in runs) / len(runs)
        rows.append((name, mean, f"{wall:.0f}" + (" (incl. class images)" if any(r[2] for r in runs) else "")))
    print(f"Toy world, examples/toy_subject (or the row's variant of it) on {os.path.relpath(args.model, ROOT)}; "
          f"{args.num_images} images per prompt (seeds 0-{args.num_images - 1}), {args.class_images} for the class "
          f"prompt; training seed{'s' if len(seeds) > 1 else ''} {args.seeds}"
          f"{' (mean)' if len(seeds) > 1 else ''}; recipe {os.path.relpath(RECIPE, ROOT)} with the flags in the log "
          f"({os.path.relpath(log, ROOT)})")
    header = ("| run | fidelity ↑ | recontext ↑ | drift ↓ | class_ok ↑ | class prior changed ↓ | class colours | "
              "class backgrounds | train wall s |")
    print(header)
    print("|" + "---|" * 9)
    for name, n, wall in rows:
        print(f"| {name} | {n['fidelity']:.2f} | {n['recontext']:.2f} | {n['drift']:.2f} | {n['class_ok']:.2f} | "
              f"{n['prior_change']:.2f} | {n['colours']:.1f} | {n['backgrounds']:.1f} | {wall or '—'} |")
    if RECIPE_ROW in first_images:  # how close a quantized-base LoRA draws to the full-base one, on the full base
        import numpy as np

        def gap(a, b):
            return float(np.mean([np.abs(np.asarray(x, dtype=np.float32) - np.asarray(y, dtype=np.float32)).mean()
                                  for p in a for x, y in zip(a[p], b[p])]))
        full = first_images[RECIPE_ROW]
        for row in QUANTIZED_ROWS:
            if row in first_images:
                print(f"{list(VARIANTS)[row - 1]}, seed {seeds[0]}: its images differ from the full-base LoRA's by "
                      f"{gap(first_images[row], full):.1f} / 255 per pixel on average (the full-base LoRA's differ "
                      f"from the base model's by {gap(first_images[0], full):.1f})")


if __name__ == "__main__":
    main()
