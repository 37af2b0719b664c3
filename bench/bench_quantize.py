#!/usr/bin/env python
"""What a quantized frozen base saves: peak memory and step time of the same training command with the base in
fp32, bf16, NF4 and int8, on a model large enough that its weights dominate the memory.

    python bench/bench_quantize.py                 # ~10 min on 2 CPU cores, 8 GB of RAM, 3 GB of disk
    python bench/bench_quantize.py --quick         # a smaller model, for a smoke test

The model is Flux.1's architecture (examples/make_tiny_model.py: build_tiny_flux_pipeline) at 1536-wide sizes:
a 0.64B-parameter transformer (2.4 GiB in fp32, saved in 256 MB shards as the hub's big checkpoints are; every
block's linear layers quantizable, as in Flux.1 and SD 3), with small text encoders and VAE, random weights. Each run is train_dreambooth_lora.py as a user runs it
(64 px, batch 1, 3 steps, text embeddings and latents cached); the numbers come from its train_stats.json: peak RSS
of the whole run and of the model load, the training steps' own peak, and the median step time.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"full": dict(num_attention_heads=12, attention_head_dim=128, axes_dims_rope=(16, 56, 56), num_layers=4,
                      num_single_layers=8),
         "quick": dict(num_attention_heads=2, attention_head_dim=128, axes_dims_rope=(16, 56, 56), num_layers=2,
                       num_single_layers=2)}
RUNS = {"fp32 base": ["--mixed_precision", "no"],
        "bf16 base (--mixed_precision bf16)": ["--mixed_precision", "bf16"],
        "NF4 base (--quantize_base nf4)": ["--mixed_precision", "no", "--quantize_base", "nf4"],
        "int8 base (--quantize_base int8)": ["--mixed_precision", "no", "--quantize_base", "int8"]}


def build(folder, size):
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    from make_tiny_model import build_tiny_flux_pipeline
    pipe = build_tiny_flux_pipeline(**SIZES[size])
    params = sum(p.numel() for p in pipe.transformer.parameters())
    pipe.save_pretrained(folder)
    # in 256 MB shards, as the hub's big checkpoints are (FLUX.1-dev's transformer: 3 files): a loader maps one
    # shard at a time
    import shutil
    shutil.rmtree(os.path.join(folder, "transformer"))
    pipe.transformer.save_pretrained(os.path.join(folder, "transformer"), max_shard_size="256MB")
    return params


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()
    work = args.workdir or tempfile.mkdtemp(prefix="bench-quantize-")
    size = "quick" if args.quick else "full"
    model = os.path.join(work, f"flux-{size}")
    params = build(model, size) if not os.path.isdir(model) else None
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from conftest import draw_subject
    images = os.path.join(work, "dog")
    os.makedirs(images, exist_ok=True)
    for i in range(3):
        draw_subject(os.path.join(images, f"dog{i}.png"), shift=i * 3)
    rows = []
    for name, flags in RUNS.items():
        out = os.path.join(work, name.split()[0])
        cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"), "--pretrained_model_name_or_path",
               model, "--instance_data_dir", images, "--instance_prompt", "a photo of sks dog", "--resolution", "64",
               "--train_batch_size", "1", "--max_train_steps", "3", "--seed", "0", "--center_crop",
               "--report_to", "none", "--output_dir", out, "--overwrite_output_dir", *flags]
        r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if r.returncode:
            sys.exit(f"{name} failed:\n{r.stderr[-3000:]}")
        with open(os.path.join(out, "train_stats.json")) as f:
            stats = json.load(f)
        rows.append((name, stats))
        print(f"{name}: done", file=sys.stderr, flush=True)
    fp32 = rows[0][1]["peak_rss_mb"]
    print(f"Flux.1-architecture transformer{f' of {params / 1e9:.2f}B parameters' if params else ''} ({size}), "
          "64 px, batch 1, 3 steps, CPU")
    print("| base | peak RSS MiB | vs fp32 | load peak MiB | training steps' peak MiB | s/step |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['peak_rss_mb']:.0f} | {s['peak_rss_mb'] / fp32:.2f}x | "
              f"{s['phase_peaks']['load']['peak_rss_mb']:.0f} | {s['train_peak_rss_mb']:.0f} | "
              f"{s['step_seconds_median']:.2f} |")


if __name__ == "__main__":
    main()
