#!/usr/bin/env python
"""Ours against diffusers' own DreamBooth LoRA script for a flow-matching family, at the same command, on the
tiny model of that family built here (examples/make_tiny_model.py):

    python bench/bench_flow.py --diffusers_scripts DIR            # DIR holds train_dreambooth_lora_sd3.py (and _flux.py)
    python bench/bench_flow.py --diffusers_scripts DIR --family sd3 flux --steps 20 120

diffusers' scripts are not part of its wheel: take them from a diffusers checkout (examples/dreambooth/). They run
through bench/run_diffusers_script.py (their torchvision transforms on a PIL stand-in; see there).
Per run: seconds per optimizer step, from the wall time of two runs that differ only in --max_train_steps (so
start-up, model loading and saving cancel out); start-up (the rest of the shorter run: loading, class images,
caching, saving); peak RSS of the whole process (ru_maxrss of a child that runs nothing else). Each cell is the
median of --repeats runs. With prior preservation a first, untimed run of each trainer generates the class images
(diffusers: its pipeline's defaults, ours: --class_generation_steps 25 at --resolution) and the timed runs reuse
them; that first run's extra seconds are printed below the table.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = {"sd3": "train_dreambooth_lora_sd3.py", "flux": "train_dreambooth_lora_flux.py"}
BUILD = {"sd3": ["--family", "sd3"], "flux": ["--family", "flux"]}
MEASURE = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
           "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE); "
           "print(rc.returncode, time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
           "sys.stderr.write(rc.stderr.decode()[-2000:] if rc.returncode else '')")


def measure(cmd):
    """(seconds, peak RSS MiB) of one command, in a fresh child process."""
    r = subprocess.run([sys.executable, "-c", MEASURE, *cmd], capture_output=True, text=True,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}, cwd=ROOT)
    code, seconds, rss = r.stdout.split()
    if int(code):
        raise SystemExit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return float(seconds), int(rss) / 1024


def command(who, script_dir, family, model, images, out, steps, extra):
    flags = ["--pretrained_model_name_or_path", model, "--instance_data_dir", images, "--instance_prompt",
             "a photo of sks dog", "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", str(steps),
             "--seed", "0", "--output_dir", out, "--checkpointing_steps", "100000", *extra]
    if who == "ours":
        return [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"), *flags, "--report_to", "none"]
    return [sys.executable, os.path.join(ROOT, "bench", "run_diffusers_script.py"),
            os.path.join(script_dir, SCRIPTS[family]), *flags, "--report_to", "tensorboard"]


def row(who, args, family, model, images, work, setup, extra):
    short, long = args.steps
    cells = []
    warm = None
    if "--with_prior_preservation" in extra:  # the class images made once, outside the timed runs
        warm = measure(command(who, args.diffusers_scripts, family, model, images,
                               os.path.join(work, f"{family}-{setup.strip('-')}-{who}-warm"), 1, extra))[0]
    for k in range(args.repeats):
        times = {}
        for steps in (short, long):
            out = os.path.join(work, f"{family}-{setup.strip('-')}-{who}-{steps}-{k}")
            times[steps] = measure(command(who, args.diffusers_scripts, family, model, images, out, steps, extra))
        per_step = (times[long][0] - times[short][0]) / (long - short)
        cells.append((per_step, times[short][0] - short * per_step, max(times[short][1], times[long][1])))
    per_step, startup, rss = (statistics.median(c[i] for c in cells) for i in range(3))
    # what the first run paid on top (class images): its wall time minus a cached run's start-up and one step
    return per_step, startup, rss, (warm - startup - per_step) if warm is not None else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers_scripts", required=True,
                        help="Folder with diffusers' train_dreambooth_lora_sd3.py / _flux.py.")
    parser.add_argument("--family", nargs="+", default=["sd3"], choices=sorted(SCRIPTS))
    parser.add_argument("--steps", nargs=2, type=int, default=(20, 120), help="The two run lengths compared.")
    parser.add_argument("--repeats", type=int, default=3, help="Runs per cell (median).")
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--only", default=None, help="Run only the setups whose name contains this text.")
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-flow-")
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import draw_subject
    images = os.path.join(work, "dog")
    os.makedirs(images, exist_ok=True)
    for i in range(3):
        draw_subject(os.path.join(images, f"dog{i}.png"), shift=i * 3)
    setups = {"defaults": [], "--cache_latents": ["--cache_latents"],
              "--train_text_encoder": ["--train_text_encoder"],
              "prior, 8 class images": ["--with_prior_preservation", "--class_prompt", "a photo of dog",
                                        "--num_class_images", "8", "--class_data_dir", "{work}/class-{who}"],
              "text encoders every step": ["--no-pre_compute_text_embeddings"]}
    ours_only = {"text encoders every step"}  # diffusers' scripts have no such switch
    print("| family | setup | trainer | s/step | start-up s | peak RSS MiB |\n|---|---|---|---|---|---|")
    results = []
    for family in args.family:
        model = os.path.join(work, f"tiny-{family}")
        if not os.path.isdir(model):
            subprocess.run([sys.executable, os.path.join(ROOT, "examples", "make_tiny_model.py"), *BUILD[family],
                            "--out", model], check=True, capture_output=True)
        for setup, extra in setups.items():
            if args.only and args.only not in setup:
                continue
            for who in ("ours",) if setup in ours_only else ("ours", "diffusers"):
                flags = [f.format(work=work, who=f"{family}-{who}") for f in extra]
                per_step, startup, rss, first_extra = row(who, args, family, model, images, work, setup, flags)
                results.append(dict(family=family, setup=setup, trainer=who, s_per_step=per_step, startup_s=startup,
                                    peak_rss_mib=rss, first_run_extra_s=first_extra))
                print(f"| {family} | {setup} | {who} | {per_step:.3f} | {startup:.1f} | {rss:.0f} |", flush=True)
    with open(os.path.join(work, "bench_flow.json"), "w") as f:
        json.dump(results, f, indent=2)
    for r in results:
        if r["first_run_extra_s"] is not None:
            print(f"class images ({r['family']}, {r['trainer']}): the first run took {r['first_run_extra_s']:.1f} s "
                  "more than a run that found them cached")
    print(f"\nsteps {args.steps[0]} vs {args.steps[1]}, median of {args.repeats}; json: {work}/bench_flow.json "
          f"({time.strftime('%Y-%m-%d')})")


if __name__ == "__main__":
    main()
