#!/usr/bin/env python
"""What a run learns, measured on the toy world: base vs LoRA without prior preservation vs LoRA with prior
preservation (diffusers' settings) vs LoRA with prior preservation (this project's recommended recipe,
examples/recipes/toy_demo.yaml), then that recipe with pivotal tuning, with Prodigy at its default rate, and both.

Each LoRA trains on examples/toy_subject from examples/toy-base (the trainer, as a user runs it), then the
pixel scorer (examples/toy_world.py) reads --num_images images per prompt, seeds 0..N-1, the same for every row:
fidelity (instance prompt shows the striped subject), recontext (subject on the asked background), drift
(class prompt "a circle" shows the subject) and class_ok (class prompt gives an ordinary one-colour circle).
Wall time is the training command's (class images are cached by settings: a run that had to generate them
is marked).

    nice -n 19 python bench/bench_toy.py --num_images 8 --only 1,2,3      # ~5 min on 2 CPU cores (README's first table)
    nice -n 19 python bench/bench_toy.py --num_images 8 --only 3,4,5,6,7  # pivotal tuning and Prodigy (its second)
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, ROOT)

RECIPE = os.path.join(ROOT, "examples", "recipes", "toy_demo.yaml")
# Rows: name -> flags on top of the recipe. The recipe is the recommended one; the diffusers row undoes what
# it changes (UNet-only LoRA, diffusers' learning rate, prior weight 1.0), the no-prior row drops the prior.
PIVOTAL = ["--train_text_encoder_ti", "--token_abstraction", "sks"]
VARIANTS = {
    "LoRA, no prior preservation": ["--no-with_prior_preservation"],
    "LoRA + prior, diffusers' settings": ["--no-train_text_encoder", "--learning_rate", "5e-4", "--rank", "4",
                                          "--noise_offset", "0", "--prior_loss_weight", "1.0"],
    "LoRA + prior, recommended (toy_demo.yaml)": [],
    # Issue 14: pivotal tuning ("sks" becomes two new trained tokens; the scorer's prompts are rewritten the same
    # way) with and without the text encoder's LoRA, and Prodigy at its default rate instead of the searched 5e-3.
    "pivotal tuning + LoRA (recipe + --train_text_encoder_ti)": PIVOTAL,
    "pivotal tuning + UNet LoRA (no text-encoder LoRA)": PIVOTAL + ["--no-train_text_encoder"],
    "recipe with Prodigy, --learning_rate 1.0": ["--optimizer", "prodigy", "--learning_rate", "1.0"],
    "pivotal tuning + LoRA with Prodigy, --learning_rate 1.0": PIVOTAL + ["--optimizer", "prodigy",
                                                                          "--learning_rate", "1.0"],
}


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
    parser.add_argument("--num_images", type=int, default=16, help="Seeds per prompt for the scorer.")
    parser.add_argument("--out", default=os.path.join(ROOT, "work_dirs", "bench_toy"), help="Runs and logs go here.")
    parser.add_argument("--only", default=None,
                        help=f"Comma-separated row numbers (1-{len(VARIANTS)}) to run (default: all), e.g. 3,4,5,6,7 "
                             "for the recipe against pivotal tuning and Prodigy.")
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
    pipe = demo_grids.load_pipeline(args.model)
    rows = [("base model (no training)", demo_grids.score_lora(pipe, None, args.num_images)[0], None)]
    chosen = set(int(x) for x in args.only.split(",")) if args.only else None
    for i, (name, flags) in enumerate(VARIANTS.items(), 1):
        if chosen and i not in chosen:
            continue
        out = os.path.join(args.out, f"run{i}")
        wall, generated = train(name, flags, out, log, args.model)
        numbers = demo_grids.score_lora(pipe, out, args.num_images)[0]  # pivotal runs: tokens loaded, prompts rewritten
        rows.append((name, numbers, f"{wall:.0f}" + (" (incl. class images)" if generated else "")))
        print(f"{name}: {demo_grids.fmt(numbers)} in {wall:.0f}s", file=sys.stderr, flush=True)
    print(f"Toy world, examples/toy_subject on {os.path.relpath(args.model, ROOT)}; {args.num_images} images per prompt (seeds "
          f"0-{args.num_images - 1}); recipe {os.path.relpath(RECIPE, ROOT)} with the flags in the log "
          f"({os.path.relpath(log, ROOT)})")
    header = "| run | fidelity ↑ | recontext ↑ | drift ↓ | class_ok ↑ | train wall s |"
    print(header)
    print("|" + "---|" * 6)
    for name, n, wall in rows:
        print(f"| {name} | {n['fidelity']:.2f} | {n['recontext']:.2f} | {n['drift']:.2f} | {n['class_ok']:.2f} | "
              f"{wall or '—'} |")


if __name__ == "__main__":
    main()
