#!/usr/bin/env python
"""Seconds per step and GPU memory of real DreamBooth runs on a CUDA GPU, each beside the bare UNet floor.

    python bench/bench_gpu.py                       # one CUDA GPU: about 10 minutes (SD 1.5 and SDXL sizes)
    python bench/bench_gpu.py --models sd15         # SD 1.5 size only (about 4 minutes)
    python bench/bench_gpu.py --quick               # tiny models, 4 steps: a smoke test, runs on CPU too

Not run in CI (no GPU there). Models have SD 1.5's and SDXL base's exact architectures and sizes with random
weights (built here, nothing downloaded): speed and memory do not depend on the weights' values. Every
training run is a subprocess of train_dreambooth_lora.py with the trainer's defaults (text embeddings and
latents computed once: square photos) plus the row's flags; its numbers come from the train_stats.json it
writes: the mean seconds per step (on a GPU the host waits only at loss reads, so the mean is the honest
one) and torch.cuda.max_memory_allocated during the training steps. Beside each, in this process: the floor,
one forward+backward of the bare UNet with the same LoRA at the same batch (instance + class) and dtype.
Table 2: class images per second, ours (batched, DPM-Solver++ 25 steps) against a plain pipeline loop at 50
steps, one image per call.
"""
import argparse
import contextlib
import gc
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train import build, build_sdxl_size, make_images, table  # noqa: E402

MEMORY_OPTIONS = ["--gradient_checkpointing", "--use_8bit_adam"]


def setups(precisions, quick):
    """Row label -> extra training flags."""
    rows = {}
    for p in precisions:
        rows[f"{p}"] = ["--mixed_precision", p]
    p = precisions[0]
    rows[f"{p}, gradient checkpointing"] = ["--mixed_precision", p, "--gradient_checkpointing"]
    rows[f"{p}, gradient checkpointing, 8-bit AdamW"] = ["--mixed_precision", p, *MEMORY_OPTIONS]
    if not quick:  # inductor takes minutes on CPU
        rows[f"{p}, --torch_compile"] = ["--mixed_precision", p, "--torch_compile"]
    return rows


def floor_seconds(model_dir, family, resolution, dtype, device, iters, checkpointing=False):
    """The bare UNet (frozen, in dtype) with a rank-4 LoRA (fp32): forward+backward at batch 2, mean seconds."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet", torch_dtype=dtype).to(device)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    size = resolution // 8
    latents = torch.randn(2, 4, size, size, device=device, dtype=dtype)
    states = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    extra = {}
    if family == "sdxl":  # pooled text embedding and 6 time ids, sized from the UNet's own config
        pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, device=device, dtype=dtype),
                                       "time_ids": torch.tensor([[resolution] * 2 + [0, 0] + [resolution] * 2] * 2,
                                                                device=device, dtype=dtype)}}
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for i in range(iters + 3):
        t = torch.randint(0, 1000, (2,), device=device)
        sync(device)
        start = time.perf_counter()
        with autocast:
            pred = unet(latents, t, states, return_dict=False, **extra)[0]
        torch.nn.functional.mse_loss(pred.float(), latents.float()).backward()
        unet.zero_grad(set_to_none=True)
        sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    del unet, latents, states
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return statistics.fmean(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()  # a host sync: only the floor's timing needs it


def train(model_dir, instance_dir, class_dir, out, resolution, steps, flags):
    cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"),
           "--pretrained_model_name_or_path", model_dir, "--instance_data_dir", instance_dir,
           "--instance_prompt", "a photo of sks dog", "--resolution", str(resolution), "--train_batch_size", "1",
           "--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", class_dir,
           "--num_class_images", "8", "--sample_batch_size", "4", "--max_train_steps", str(steps),
           "--checkpointing_steps", "100000", "--seed", "0", "--output_format", "diffusers", "--report_to", "none",
           "--output_dir", out, "--overwrite_output_dir", *flags]
    started = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"training failed ({' '.join(flags)}):\n{r.stderr[-3000:]}")
    with open(os.path.join(out, "train_stats.json")) as f:
        stats = json.load(f)
    stats["wall_seconds"] = time.perf_counter() - started
    return stats


def plain_images_per_second(model_dir, family, resolution, dtype, device, count):
    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe("a photo of dog", num_inference_steps=2, height=resolution, width=resolution)  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(count):
        pipe("a photo of dog", num_inference_steps=50, height=resolution, width=resolution,
             generator=torch.Generator(device).manual_seed(i))
    sync(device)
    rate = count / (time.perf_counter() - start)
    del pipe
    gc.collect()
    return rate


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl", help="Comma-separated: sd15 (512 px), sdxl (1024 px).")
    parser.add_argument("--steps", type=int, default=12, help="Training steps per run (the first 2 are not timed).")
    parser.add_argument("--quick", action="store_true", help="Tiny models at 64 px, 4 steps: checks the script.")
    parser.add_argument("--workdir", default=None, help="Keep models and runs here (default: a temp folder).")
    parser.add_argument("--out", default=None, help="Also write the tables to this markdown file.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.quick:
        raise SystemExit("bench_gpu.py needs a CUDA GPU (use --quick for a CPU smoke test of the script)")
    precisions = ["fp16", "bf16"] if device.type == "cuda" else ["bf16"]
    work = args.workdir or tempfile.mkdtemp(prefix="bench-gpu-")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    header = (f"{name}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}; random-weight models of the "
              f"real sizes; batch 2 (1 instance + 1 class); work dir {work}")
    print(header, flush=True)
    steps = 4 if args.quick else args.steps
    rows, prior_rows = [], []
    for family in args.models.split(","):
        if args.quick:
            from make_tiny_model import build_tiny_pipeline, build_tiny_sdxl_pipeline
            res = 64
            model = os.path.join(work, f"tiny-{family}")
            if not os.path.isdir(model):
                (build_tiny_sdxl_pipeline(sample_size=8) if family == "sdxl" else build_tiny_pipeline(
                    sample_size=8, vae_channels=(32, 64, 64, 64))).save_pretrained(model)
        elif family == "sdxl":
            res, model = 1024, build_sdxl_size(os.path.join(work, "sdxl-size"))
        else:
            from make_tiny_model import SD15_SIZE
            res, model = 512, build(os.path.join(work, "sd15-size"), **SD15_SIZE)
        instance_dir = make_images(os.path.join(work, f"dog-{res}"), 4, size=(res, res))
        class_dir = os.path.join(work, f"class-{family}")
        shutil.rmtree(class_dir, ignore_errors=True)  # the first run generates them: table 2 times that
        first = True
        for label, flags in setups(precisions, args.quick).items():
            stats = train(model, instance_dir, class_dir, os.path.join(work, f"run-{family}-{len(rows)}"), res,
                          steps, flags)
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[flags[1]]
            floor = floor_seconds(model, family, res, dtype, device, 3 if args.quick else 10,
                                  "--gradient_checkpointing" in flags)
            ours = stats["step_seconds_mean"]
            vram = stats.get("train_peak_vram_mb")
            rows.append([f"{family} @{res}px", label, f"{floor * 1000:.0f}", f"{ours * 1000:.0f}",
                         f"{ours / floor:.2f}x", f"{vram / 1024:.2f}" if vram else "-",
                         f"{stats['setup_seconds']:.0f}"])
            print(rows[-1], flush=True)
            if first:  # this run generated the class images; the later ones reuse them
                dtype0 = {"fp16": torch.float16, "bf16": torch.bfloat16}[precisions[0]]
                plain = plain_images_per_second(model, family, res, dtype0, device, 2 if args.quick else 4)
                ours_rate = stats["class_images_generated"] / stats["class_generation_seconds"]
                prior_rows.append([f"{family} @{res}px", precisions[0], f"{plain:.2f}", f"{ours_rate:.2f}",
                                   f"{ours_rate / plain:.1f}x"])
                first = False
    t1 = ("1. Seconds per step (mean) against the bare UNet+LoRA forward+backward floor at the same batch, dtype "
          "and checkpointing; peak GPU memory during the training steps (torch.cuda.max_memory_allocated)")
    t2 = "2. Class images per second: plain pipeline loop (50 steps, 1 image/call) vs ours (25 steps, batch 4)"
    buf = io.StringIO()  # the tables once, printed and (with --out) written
    with contextlib.redirect_stdout(buf):
        print(header)
        table(t1, ["model", "flags", "floor ms", "ours ms", "ratio", "peak VRAM GiB", "setup s"], rows)
        table(t2, ["model", "precision", "plain img/s", "ours img/s", "speed-up"], prior_rows)
    print(buf.getvalue().split("\n", 1)[1], end="")  # the header line was printed at the start
    if args.out:
        with open(args.out, "w") as f:
            f.write(buf.getvalue())


if __name__ == "__main__":
    main()
