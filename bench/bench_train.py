#!/usr/bin/env python
"""Where a DreamBooth run's time and memory go, measured on SD-architecture models built here.

    python bench/bench_train.py            # about 11 minutes on 2 CPU cores; needs 9 GB of RAM and 5 GB of disk
    python bench/bench_train.py --quick    # fewer steps, for a smoke test

Prints one table per question, all from the same run:
  1. step time: the bare UNet+LoRA forward/backward at the training batch (the floor: instance + class
     images in one call), against our steady-state seconds per step with nothing cached (diffusers'
     behaviour), with the defaults (random crops: text embeddings cached), and the defaults + --center_crop;
  2. class priors: our generation (batched, DPM-Solver++ 25 steps, components reused) against a plain
     DiffusionPipeline loop at 50 steps, one image at a time; and a second run with the same settings;
  3. memory: peak RSS during the training steps of a model with SD 1.5's sizes (random weights, 4.0 GiB in
     fp32) at 512 px, with and without the memory options, against the size of its weights in fp32;
  4. how step time grows with resolution, and 5. how setup grows with the number of instance images.

    python bench/bench_train.py --sdxl_memory   # table 6 alone: about 25 minutes, 20 GB of RAM, 9 GB of disk

  6. memory training a model with SDXL base's sizes (random weights, 13 GiB in fp32) at 1024 px with the
     memory options, against the size of its weights in fp32.
Training runs are real subprocesses of train_dreambooth_lora.py; their numbers come from the
train_stats.json each run writes.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))

MODELS = {  # name: (builder kwargs, resolution); the VAE downsamples 8x as SD's does
    "tiny (32,64) @64px": (dict(unet_channels=(32, 64), cross_attention_dim=32, vae_channels=(32, 64, 64, 64),
                                sample_size=8), 64),
    "small (64,128,256) x256 @128px": (dict(unet_channels=(64, 128, 256), cross_attention_dim=256,
                                            vae_channels=(32, 64, 64, 64), sample_size=16), 128),
}
# Class priors only: the tiny UNet on 32x32 latents (a 2x VAE), where 2 CPU cores are saturated at batch 1 and
# batching cannot help, so only the step count does.
COMPUTE_BOUND = {"tiny, 2x VAE (32x32 latents) @64px": (dict(unet_channels=(32, 64), cross_attention_dim=32,
                                                             vae_channels=(32, 64), sample_size=32), 64)}


def build(folder, **kwargs):
    from make_tiny_model import build_tiny_pipeline
    if not os.path.isdir(folder):
        build_tiny_pipeline(**kwargs).save_pretrained(folder)
    return folder


def make_images(folder, count, size=(160, 128)):
    from make_subject_images import draw_dog
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        draw_dog(size, (i * 7) % 20 - 10, (i * 3) % 10 - 5, 0.8 + 0.02 * (i % 10), (200, 190 - i % 40, 170)).save(
            os.path.join(folder, f"dog{i:03d}.png"))
    return folder


def bare_unet_step(model_dir, resolution, batch, iters):
    """The floor: UNet with the same LoRA, one forward+backward on random latents and prompt states.
    Returns the median seconds per step."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    unet.train()
    factor = resolution // unet.config.sample_size
    size = resolution // factor
    latents = torch.randn(batch, 4, size, size)
    states = torch.randn(batch, 77, unet.config.cross_attention_dim)
    times = []
    for i in range(iters + 3):
        t = torch.randint(0, 1000, (batch,))
        start = time.perf_counter()
        pred = unet(latents, t, states, return_dict=False)[0]
        torch.nn.functional.mse_loss(pred, latents).backward()
        unet.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def floor_in_subprocess(model_dir, resolution, iters):
    """The floor measured in a fresh process, like the training runs it is compared with."""
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--floor", model_dir, str(resolution), str(iters)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"floor measurement failed:\n{r.stderr[-3000:]}")
    return float(r.stdout.strip().splitlines()[-1])


def plain_pipeline_images_per_second(model_dir, resolution, count):
    """What diffengine-style generation costs: load a pipeline, then one image per call at 50 steps (the load
    is not timed)."""
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    for i in range(count):
        pipe("a photo of dog", num_inference_steps=50, height=resolution, width=resolution,
             generator=torch.Generator().manual_seed(i))
    return count / (time.perf_counter() - start)


def train(model_dir, instance_dir, out, resolution, steps, *extra):
    cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"),
           "--pretrained_model_name_or_path", model_dir, "--instance_data_dir", instance_dir,
           "--instance_prompt", "a photo of sks dog", "--resolution", str(resolution), "--train_batch_size", "1",
           "--max_train_steps", str(steps), "--checkpointing_steps", "100000", "--seed", "0",
           "--output_format", "diffusers", "--output_dir", out, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"training failed:\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "train_stats.json")) as f:
        return json.load(f)


def table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |")


def prior_row(name, model, res, first, again, quick):
    """Our class-image rate (from a training run's stats) against the plain pipeline loop on the same model."""
    ours = first["class_images_generated"] / first["class_generation_seconds"]
    baseline = plain_pipeline_images_per_second(model, res, 2 if quick else 4)
    return [name, f"{baseline:.2f}", f"{ours:.2f}", f"{ours / baseline:.1f}x",
            f"{first['class_images_generated']} in {first['class_generation_seconds']:.1f}s",
            f"{again['class_images_generated']} in {again.get('class_generation_seconds', 0):.2f}s"]


# Table 1's runs. The instance photos are 160x128, so with diffusers' default random crops only the text
# embeddings can be computed once; with --center_crop (or square photos, or buckets) the latents can too.
NOTHING_CACHED = "nothing cached: --no-cache_latents --no-pre_compute_text_embeddings (diffusers' behaviour)"
CENTER_CROP_DEFAULT = "defaults + --center_crop (text embeddings and latents cached)"
STEP_SETUPS = {
    NOTHING_CACHED: ["--no-cache_latents", "--no-pre_compute_text_embeddings"],
    "defaults, random crops of 160x128 photos (text embeddings cached)": [],
    CENTER_CROP_DEFAULT: ["--center_crop"],
}

MEMORY_SETUPS = {  # label: extra training flags
    "fp32, gradient checkpointing": ["--gradient_checkpointing"],
    "bf16, cached latents + text embeddings": ["--mixed_precision", "bf16", "--center_crop"],
    "bf16, cached, gradient checkpointing, 8-bit AdamW": ["--mixed_precision", "bf16", "--center_crop",
                                                          "--gradient_checkpointing", "--use_8bit_adam"],
}


def memory_rows(model, res, work, steps, setups=MEMORY_SETUPS):
    """Peak RSS while training a model the size users train, with and without the memory options, against the
    size of all its weights in fp32. Batch 2: one instance and one (given) class image."""
    instance_dir = make_images(os.path.join(work, f"dog3-{res}"), 3, size=(res * 5 // 4, res))
    class_dir = make_images(os.path.join(work, f"class1-{res}"), 1, size=(res * 5 // 4, res))
    rows = []
    for i, (label, flags) in enumerate(setups.items()):
        stats = train(model, instance_dir, os.path.join(work, f"mem-{res}-{i}"), res, steps, "--with_prior_preservation",
                      "--class_prompt", "a photo of dog", "--class_data_dir", class_dir, "--num_class_images", "1",
                      *flags)
        weights = stats["model_weights_fp32_mb"]
        rows.append([label, f"{weights / 1024:.2f}", f"{stats['baseline_rss_mb'] / 1024:.2f}",
                     f"{stats['train_peak_rss_mb'] / 1024:.2f}", f"{stats['train_peak_rss_mb'] / weights:.2f}",
                     f"{stats['setup_peak_rss_mb'] / 1024:.2f}", f"{stats['step_seconds_median']:.1f}"])
    return rows


def build_sdxl_size(folder):
    """SDXL base's architecture and sizes with random weights, made in bf16 (the 13 GiB fp32 model never exists
    in memory) and saved as a diffusers folder."""
    from make_tiny_model import SDXL_SIZE, build_tiny_sdxl_pipeline
    if not os.path.isdir(folder):
        torch.set_default_dtype(torch.bfloat16)
        try:
            build_tiny_sdxl_pipeline(**SDXL_SIZE).save_pretrained(folder)
        finally:
            torch.set_default_dtype(torch.float32)
    return folder


def sdxl_memory_table(work):
    model = build_sdxl_size(os.path.join(work, "sdxl-size"))
    setups = {"bf16, cached, gradient checkpointing, 8-bit AdamW": MEMORY_SETUPS[
        "bf16, cached, gradient checkpointing, 8-bit AdamW"]}
    table("6. Memory (GiB) training SDXL base size (random weights) @1024px, batch 2 (1 instance + 1 class), with "
          "the memory options: all weights in fp32, RSS after importing the libraries, peak RSS during the training "
          "steps, its ratio to the fp32 weights (target < 1.25), peak RSS while loading, s/step",
          ["setup", "weights fp32", "after imports", "training peak", "ratio", "loading peak", "s/step"],
          memory_rows(model, 1024, work, 2, setups))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="Fewer steps and images, and the memory table on the small model (smoke test).")
    parser.add_argument("--workdir", default=None, help="Keep models and runs here (default: a temp folder).")
    parser.add_argument("--sdxl_memory", action="store_true",
                        help="Only table 6: memory training an SDXL-size model at 1024 px (about 25 minutes).")
    parser.add_argument("--floor", nargs=3, metavar=("MODEL", "RES", "ITERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:  # internal: one floor measurement, printed in seconds
        print(bare_unet_step(args.floor[0], int(args.floor[1]), 2, int(args.floor[2])))
        return
    if args.sdxl_memory:
        work = args.workdir or tempfile.mkdtemp(prefix="bench-dreambooth-")
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; work dir {work}")
        sdxl_memory_table(work)
        return
    steps = 12 if args.quick else 40
    n_class = 4 if args.quick else 8
    work = args.workdir or tempfile.mkdtemp(prefix="bench-dreambooth-")
    instance_dir = make_images(os.path.join(work, "dog5"), 5)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; work dir {work}")

    def prior_flags(short):
        return ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir",
                os.path.join(work, f"class-{short}"), "--num_class_images", str(n_class),
                "--sample_batch_size", str(n_class)]

    step_rows, prior_rows = [], []
    rounds = 1 if args.quick else 3
    for name, (kwargs, res) in MODELS.items():
        short = name.split()[0]
        model = build(os.path.join(work, short), **kwargs)
        # This machine's speed drifts by 20% over minutes: each run is compared with the mean of the floors
        # measured just before and just after it, and the table shows medians over the rounds.
        def floor():
            return floor_in_subprocess(model, res, 10 if args.quick else 30)
        floors, runs = [floor()], {label: [] for label in STEP_SETUPS}
        ratios = {label: [] for label in STEP_SETUPS}
        for r in range(rounds):
            for k, (label, flags) in enumerate(STEP_SETUPS.items()):
                runs[label].append(train(model, instance_dir, os.path.join(work, f"run-{short}-{k}-{r}"), res, steps,
                                         *prior_flags(short), *flags))
                floors.append(floor())
                ratios[label].append(runs[label][-1]["step_seconds_median"] * 2 / (floors[-2] + floors[-1]))
        for label in STEP_SETUPS:
            ours = statistics.median(run["step_seconds_median"] for run in runs[label])
            setup = statistics.median(run["setup_seconds"] for run in runs[label])
            step_rows.append([name, label, f"{statistics.median(floors) * 1000:.1f}", f"{ours * 1000:.1f}",
                              f"{statistics.median(ratios[label]):.2f}x", f"{setup:.1f}"])
        plains, cacheds = runs[NOTHING_CACHED], runs[CENTER_CROP_DEFAULT]
        prior_rows.append(prior_row(name, model, res, plains[0], cacheds[0], args.quick))
    for name, (kwargs, res) in COMPUTE_BOUND.items():
        model = build(os.path.join(work, "tiny-2x-vae"), **kwargs)
        first, again = (train(model, instance_dir, os.path.join(work, f"run-2x-vae-{i}"), res, 2,
                              *prior_flags("2x-vae")) for i in range(2))
        prior_rows.append(prior_row(name, model, res, first, again, args.quick))

    table("1. Seconds per step: the floor is a bare UNet+LoRA forward+backward at batch 2 (1 instance + 1 class); "
          "ratio: each run against the floors measured just before and after it, median of the rounds",
          ["model", "ours", "floor ms", "ours ms", "ratio", "setup s"], step_rows)
    table(f"2. Class priors ({n_class} images): plain pipeline loop at 50 steps, 1 image/call vs ours "
          "(DPM-Solver++ 25 steps, batched, components reused)",
          ["model", "plain img/s", "ours img/s", "speed-up", "first run", "second run (same settings)"], prior_rows)

    if args.quick:
        mem_name, (mem_kwargs, mem_res), mem_steps = "small (64,128,256) x256 @128px", MODELS[
            "small (64,128,256) x256 @128px"], 3
    else:
        from make_tiny_model import SD15_SIZE
        mem_name, (mem_kwargs, mem_res), mem_steps = "SD 1.5 size (random weights) @512px", (SD15_SIZE, 512), 3
    mem_model = build(os.path.join(work, mem_name.split()[0] + "-mem"), **mem_kwargs)
    table(f"3. Memory (GiB) training {mem_name}, batch 2 (1 instance + 1 class): all weights in fp32, RSS after "
          "importing the libraries, peak RSS during the training steps, its ratio to the fp32 weights (target "
          "< 1.25), peak RSS while loading (the mapped fp32 files count; the kernel can drop them), s/step",
          ["setup", "weights fp32", "after imports", "training peak", "ratio", "loading peak", "s/step"],
          memory_rows(mem_model, mem_res, work, mem_steps))

    name = "small (64,128,256) x256 @128px"
    model = os.path.join(work, "small")
    res_rows = []
    for res in (64, 128, 256):
        stats = train(model, instance_dir, os.path.join(work, f"res-{res}"), res, steps // 2 + 4, "--center_crop")
        res_rows.append([res, f"{stats['step_seconds_median'] * 1000:.1f}"])
    table(f"4. Step time vs resolution ({name}, batch 1, cached)", ["resolution px", "ms/step"], res_rows)

    setup_rows = []
    for count in (5, 20, 80):
        folder = make_images(os.path.join(work, f"dog{count}"), count)
        stats = train(os.path.join(work, "tiny"), folder, os.path.join(work, f"setup-{count}"), 64, 4,
                      "--center_crop")
        setup_rows.append([count, f"{stats['setup_seconds']:.2f}"])
    table("5. Setup time (flags checked -> first step, tiny model, latents cached) vs instance images",
          ["instance images", "setup s"], setup_rows)


if __name__ == "__main__":
    main()
