"""End-to-end runs of train_dreambooth_lora.py and infer.py on tiny models."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_script, train_args

pytestmark = pytest.mark.slow


def lora_keys(path):
    with safe_open(path, "pt") as f:
        return list(f.keys()), f.metadata()


def generate(pipe, seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe("a photo of sks dog", num_inference_steps=3, generator=g, output_type="np").images[0]


def test_prior_preservation_run_writes_everything(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    class_dir = tmp_path / "class"
    r = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["eps"], instance_dir, out, "--with_prior_preservation", "--class_prompt", "a photo of dog",
        "--class_data_dir", class_dir, "--num_class_images", "5", "--sample_batch_size", "2",
        "--class_generation_steps", "2", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1", "--validation_prompt", "a photo of sks dog",
        "--num_validation_images", "2", "--validation_steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    # one settings line first, then a progress bar with loss and lr
    assert "dreambooth-lora" in r.stdout.splitlines()[0] and "prior=on (5)" in r.stdout
    assert "loss=" in r.stderr and "lr=" in r.stderr
    generated = sorted(p for p in os.listdir(class_dir) if p.endswith(".png"))
    assert len(generated) == 5 and len(set(generated)) == 5
    manifest = json.loads(open(class_dir / [p for p in os.listdir(class_dir) if p.endswith(".json")][0]).read())
    assert manifest["prompt"] == "a photo of dog" and manifest["steps"] == 2 and len(manifest["files"]) == 5
    # checkpoints_total_limit=1 keeps only the newest; it holds state and a loadable LoRA
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-4"]
    ckpt = out / "checkpoint-4"
    assert {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_lora_weights.safetensors"} <= set(
        os.listdir(ckpt))
    assert torch.load(ckpt / "optimizer.bin", weights_only=False)["param_groups"][0]["fused"]  # one kernel, no loop
    keys, _ = lora_keys(out / "pytorch_lora_weights.safetensors")
    assert keys and all(k.startswith("unet.") for k in keys)
    assert any(".to_q.lora_A.weight" in k for k in keys)  # one key style for every module (tests/test_export.py)
    assert os.path.isfile(out / "run.safetensors")  # kohya copy (default --output_format both)
    assert lora_keys(out / "run.safetensors")[1]["ss_optimizer"].startswith("torch.optim.adamw.AdamW(betas=(0.9, 0.999)")
    assert sorted(os.listdir(out / "validation")) == ["step-000002.png", "step-000004.png"]
    card = open(out / "README.md").read()
    assert card.startswith("---\nlicense: creativeml-openrail-m\n") and "instance_prompt: a photo of sks dog" in card
    assert "--with_prior_preservation" in card and "validation/step-000004.png" in card
    assert "| optimizer | adamw |" in card and "| pivotal tuning | off |" in card
    config = open(out / "config.yaml").read()
    assert "num_class_images: 5" in config and "with_prior_preservation: true" in config

    # a second run with the same class settings generates nothing
    r2 = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["eps"], instance_dir, tmp_path / "run2", "--with_prior_preservation", "--class_prompt",
        "a photo of dog", "--class_data_dir", class_dir, "--num_class_images", "5", "--class_generation_steps", "2",
        "--max_train_steps", "1", "--output_format", "diffusers"))
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "(0 generated" in r2.stdout
    assert not os.path.exists(tmp_path / "run2" / "run2.safetensors")
    assert len([p for p in os.listdir(class_dir) if p.endswith(".png")]) == 5


def test_lora_loads_changes_image_and_unloads(tiny_model, instance_dir, tmp_path):
    from diffusers import StableDiffusionPipeline
    out = tmp_path / "run"
    r = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["eps"], instance_dir, out, "--max_train_steps", "3", "--checkpointing_steps", "2",
        "--learning_rate", "5e-2", "--train_text_encoder", "--rank", "4", "--lora_alpha", "8"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "prior=off" in r.stdout and not os.path.exists(out / "class_images")
    keys, meta = lora_keys(out / "pytorch_lora_weights.safetensors")
    te_keys = [k for k in keys if k.startswith("text_encoder.")]
    assert te_keys and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te_keys)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model["eps"], safety_checker=None)
    before = generate(pipe)
    for folder in (out / "checkpoint-2", out):
        pipe.load_lora_weights(str(folder))
        after = generate(pipe)
        assert np.abs(after - before).mean() > 1e-3, f"LoRA from {folder} did not change the image"
        pipe.unload_lora_weights()
        np.testing.assert_allclose(generate(pipe), before, atol=1e-6)

    # the kohya/A1111 file (alpha as .alpha tensors) and the diffusers file (alpha in metadata) are the same
    # LoRA: same image for the same seed, to float rounding (alpha=8, rank=4 makes a wrong scale visible)
    pipe.load_lora_weights(str(out))
    from_diffusers = generate(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(str(out), weight_name="run.safetensors")
    from_kohya = generate(pipe)
    pipe.unload_lora_weights()
    assert np.abs(from_diffusers - from_kohya).max() < 1e-4
    with safe_open(out / "run.safetensors", "pt") as f:
        kohya_keys, kohya_meta = list(f.keys()), f.metadata()
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in kohya_keys)
    assert kohya_meta["ss_network_dim"] == "4" and kohya_meta["ss_network_alpha"] == "8.0"
    assert kohya_meta["instance_prompt"] == "a photo of sks dog" and kohya_meta["ss_steps"] == "3"

    # infer.py with the diffusers folder and with the kohya file gives the same images
    for lora, dest in ((out, "a"), (out / "run.safetensors", "b")):
        r = run_script("infer.py", "--base", tiny_model["eps"], "--lora", lora, "--prompt", "a photo of sks dog",
                       "--prompt", "a photo of dog", "--num_images", "2", "--steps", "3", "--output", tmp_path / dest)
        assert r.returncode == 0, r.stderr[-3000:]
        assert len([p for p in os.listdir(tmp_path / dest) if p.endswith(".png")]) == 5  # 2x2 + grid
    a = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "a" / "grid.png"), dtype=float)
    b = np.asarray(__import__("PIL.Image").Image.open(tmp_path / "b" / "grid.png"), dtype=float)
    assert np.abs(a - b).max() <= 2  # same weights through two loaders; 8-bit rounding at most


def test_v_prediction_and_single_file(tiny_model, instance_dir, tmp_path):
    r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["v"], instance_dir, tmp_path / "v",
                                                            "--max_train_steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["single"], instance_dir, tmp_path / "single", "--single_file_config", tiny_model["eps"],
        "--max_train_steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(tmp_path / "single" / "pytorch_lora_weights.safetensors")
    assert len(a) == len(load_file(tmp_path / "v" / "pytorch_lora_weights.safetensors"))


def test_resume_latest_continues_step_count(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    base = train_args(tiny_model["eps"], instance_dir, out, "--checkpointing_steps", "2")
    import sys
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    r = run_script("train_dreambooth_lora.py", *base, "--max_train_steps", "2", launcher=launcher)  # accelerate launch
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_script("train_dreambooth_lora.py", *base, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stdout and "at step 2" in r.stdout
    assert "done: 4 steps" in r.stdout
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-4"]


def test_two_process_run(tiny_model, instance_dir, tmp_path):
    import sys
    out = tmp_path / "ddp"
    class_dir = tmp_path / "class"
    r = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["eps"], instance_dir, out, "--with_prior_preservation", "--class_prompt", "a photo of dog",
        "--class_data_dir", class_dir, "--num_class_images", "4", "--sample_batch_size", "1",
        "--class_generation_steps", "2", "--max_train_steps", "2", "--checkpointing_steps", "2",
        # pivotal tuning too: the new token rows live outside the wrapped UNet, so DDP must not lose them
        "--train_text_encoder_ti", "--token_abstraction", "sks", "--initializer_concept", "dog"),
        # --standalone: torchrun picks a free port, so two suites on one machine do not collide
        launcher=[sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
        env={"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-4000:]
    assert "batch=1x1x2" in r.stdout
    assert r.stdout.count("done: 2 steps") == 1  # only the main process writes outputs
    assert len([p for p in os.listdir(class_dir) if p.endswith(".png")]) == 4
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(os.listdir(out / "checkpoint-2"))
    # The new rows started as "dog"'s embedding and trained: written once, by the main process, the final file
    # the same as the last checkpoint's.
    from transformers import CLIPTextModel, CLIPTokenizer
    tokenizer = CLIPTokenizer.from_pretrained(tiny_model["eps"], subfolder="tokenizer")
    table = CLIPTextModel.from_pretrained(tiny_model["eps"], subfolder="text_encoder").get_input_embeddings().weight
    dog = table[tokenizer.encode("dog", add_special_tokens=False)[0]]
    emb = load_file(out / "ddp_emb.safetensors")["emb_params"]
    assert emb.shape == (2, table.shape[1])
    assert not torch.allclose(emb[0].float(), dog.float()) and not torch.allclose(emb[1].float(), dog.float())
    assert torch.equal(emb, load_file(out / "checkpoint-2" / "ddp_emb.safetensors")["emb_params"])
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


def test_dataset_and_tensorboard(tiny_model, tmp_path):
    """--dataset_name with a local image folder through `datasets` (captions from a column), and loss, lr and
    validation images logged to tensorboard."""
    pytest.importorskip("datasets")
    pytest.importorskip("tensorboard")
    from conftest import draw_subject
    folder = tmp_path / "hf_dataset"
    folder.mkdir()
    rows = ["file_name,text"]
    for i in range(3):
        draw_subject(folder / f"{i}.png", shift=i)
        rows.append(f"{i}.png,a photo of sks dog number {i}")
    (folder / "metadata.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "run"
    r = run_script("train_dreambooth_lora.py", "--pretrained_model_name_or_path", tiny_model["eps"],
                   "--dataset_name", folder, "--caption_column", "text", "--instance_prompt", "a photo of sks dog",
                   "--resolution", "64", "--train_batch_size", "1", "--max_train_steps", "3", "--seed", "0",
                   "--report_to", "tensorboard", "--validation_prompt", "a photo of sks dog",
                   "--num_validation_images", "2", "--logging_steps", "2", "--output_dir", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "images=3" in r.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    logdir = out / "logs" / "dreambooth-lora"
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]  # read back at steps 2 and 3, every step logged
    assert "lr" in acc.Tags()["scalars"] and "validation" in acc.Tags()["images"]
    stats = json.load(open(out / "train_stats.json"))
    assert stats["steps_timed"] == 3 and stats["step_seconds_median"] > 0 and stats["step_seconds_mean"] > 0
    # the model is loaded before the peak counter restarts, and the process peak covers both phases
    assert stats["baseline_rss_mb"] < stats["train_peak_rss_mb"] <= stats["peak_rss_mb"]
    assert stats["setup_peak_rss_mb"] <= stats["peak_rss_mb"]
    from PIL import Image
    assert Image.open(out / "loss.png").size == (640, 320)


def test_flag_matrix_reaches_the_right_places(tiny_model, instance_dir, tmp_path):
    """One run with most of the remaining flags, each checked where it must have had its effect."""
    from diffusers import StableDiffusionPipeline
    variant_model = tmp_path / "tiny-fp16-variant"
    StableDiffusionPipeline.from_pretrained(tiny_model["eps"]).save_pretrained(variant_model, variant="fp16")
    out = tmp_path / "matrix"
    r = run_script("train_dreambooth_lora.py", *train_args(
        str(variant_model), instance_dir, out,
        "--variant", "fp16", "--revision", "main", "--tokenizer_name", os.path.join(tiny_model["eps"], "tokenizer"),
        "--prediction_type", "v_prediction", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--use_8bit_adam", "--snr_gamma", "5", "--noise_offset", "0.1", "--repeats", "2", "--train_batch_size", "2",
        "--scale_lr", "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "2", "--lr_warmup_steps", "1",
        "--lr_power", "2", "--center_crop", "--image_interpolation_mode", "bicubic", "--dataloader_num_workers", "1",
        "--num_train_epochs", "2", "--validation_epochs", "1", "--validation_prompt", "a photo of sks dog",
        "--num_validation_images", "1", "--use_dora", "--lora_target_modules", "to_q,to_v", "--rank", "2",
        "--lora_alpha", "4", "--lora_dropout", "0.05", "--adam_beta1", "0.8", "--adam_beta2", "0.99",
        "--adam_weight_decay", "0", "--adam_epsilon", "1e-7", "--max_grad_norm", "0.5", "--allow_tf32",
        "--logging_dir", "tb", "--report_to", "tensorboard", "--checkpointing_steps", "3", "--with_prior_preservation", "--class_prompt",
        "a photo of dog", "--prior_loss_weight", "0.5", "--num_class_images", "2", "--sample_batch_size", "2",
        "--class_generation_steps", "2", "--prior_generation_precision", "bf16", "--allow_nan_steps", "2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "precision=bf16" in r.stdout and "prediction_type=v_prediction" in r.stdout
    assert any(k.endswith(".dora_scale") for k in load_file(out / "matrix.safetensors"))  # DoRA in the kohya file too
    assert "done: 6 steps" in r.stdout  # 2 epochs x (3 images x 2 repeats / batch 2)
    assert sorted(os.listdir(out / "validation")) == ["step-000003.png", "step-000006.png"]  # every epoch
    keys, meta = lora_keys(out / "pytorch_lora_weights.safetensors")
    modules = {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys}
    assert modules == {"to_q", "to_v"} and any("magnitude" in k for k in keys)
    config = json.loads(meta["lora_adapter_metadata"]) if "lora_adapter_metadata" in meta else {}
    assert config.get("unet.lora_alpha") == 4 and config.get("unet.r") == 2 and config.get("unet.use_dora") is True
    opt = torch.load(out / "checkpoint-3" / "optimizer.bin", weights_only=False)
    group = opt["param_groups"][0]
    assert group["initial_lr"] == pytest.approx(2e-3)  # --scale_lr: 1e-3 x batch 2
    assert group["betas"] == (0.8, 0.99) and group["eps"] == 1e-7 and group["weight_decay"] == 0
    assert "__bnb_optimizer_quant_state__" in opt["state"][0]  # bitsandbytes AdamW8bit, not torch's AdamW
    sched = torch.load(out / "checkpoint-3" / "scheduler.bin", weights_only=False)
    assert sched["last_epoch"] == 3
    assert os.path.isdir(out / "tb")
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model["eps"], safety_checker=None)
    pipe.load_lora_weights(str(out))  # DoRA weights load in diffusers
    assert np.isfinite(generate(pipe)).all()


def test_buckets_with_prior_and_cached_latents(tiny_model, tmp_path):
    from conftest import draw_subject
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i, size in enumerate([(128, 64), (130, 66), (64, 128), (96, 96)]):
        draw_subject(folder / f"{i}.png", size=size)
    out = tmp_path / "bucketed"
    r = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["eps"], str(folder), out, "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128",
        "--bucket_reso_steps", "32", "--resolution", "64", "--train_batch_size", "2", "--cache_latents",
        "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "2",
        "--class_generation_steps", "1", "--max_train_steps", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "done: 4 steps" in r.stdout


def test_wandb_offline_gets_loss_and_validation_images(tiny_model, instance_dir, tmp_path):
    pytest.importorskip("wandb")
    out = tmp_path / "run"
    r = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["eps"], instance_dir, out, "--max_train_steps", "2", "--report_to", "wandb",
        "--validation_prompt", "a photo of sks dog", "--num_validation_images", "2"),
        env={"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true"})
    assert r.returncode == 0, r.stderr[-3000:]
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list((runs[0] / "files" / "media" / "images").glob("validation_*.png"))
    assert len(images) == 2
    assert list(runs[0].glob("run-*.wandb"))


def test_default_caching_is_exact_and_says_what_it_cached(tiny_model, instance_dir, tmp_path):
    """Fast by default, never at the cost of what was asked: with centre crops and a frozen text encoder the
    default run computes text embeddings and latents once, and its LoRA is bit-identical to the run that encodes
    everything every step: the latent cache keeps the posterior's moments and still draws a fresh sample each
    step, from the same random numbers. (With other batch shapes the VAE's float rounding may differ.)"""
    common = ("--center_crop", "--random_flip", "--max_train_steps", "3", "--sample_batch_size", "1",
              "--with_prior_preservation", "--class_prompt", "a photo of dog", "--class_data_dir", tmp_path / "class",
              "--num_class_images", "2", "--class_generation_steps", "1", "--output_format", "diffusers")
    runs = {"auto": (), "neither": ("--no-pre_compute_text_embeddings", "--no-cache_latents")}
    lines, weights = {}, {}
    for name, flags in runs.items():
        r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, tmp_path / name,
                                                               *common, *flags))
        assert r.returncode == 0, r.stderr[-3000:]
        lines[name] = [line for line in r.stdout.splitlines() if line.startswith("cache: ")]
        weights[name] = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
    assert lines["auto"] == ["cache: text embeddings of 2 prompts computed once, text encoders off the device; "
                             "latents computed once (posterior mean and std, both flips), VAE off the device"]
    assert lines["neither"] == ["cache: text encoders run every step (--no-pre_compute_text_embeddings); VAE "
                                "encodes every step (--no-cache_latents)"]
    auto, neither = weights["auto"], weights["neither"]
    assert auto.keys() == neither.keys()
    assert any(auto[k].abs().max() > 0 for k in auto if ".lora_B." in k)  # trained (B starts at zero)
    assert all(torch.equal(auto[k], neither[k]) for k in auto)
    assert "cache_latents: true" in open(tmp_path / "auto" / "config.yaml").read()  # what ran, not "null"

    # random crops of non-square photos (the fixture's 80x64) keep the VAE; a trained text encoder keeps its own
    r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, tmp_path / "crops",
                                                           "--max_train_steps", "1", "--train_text_encoder"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert ("cache: text encoders run every step (they train); VAE encodes every step: random crops of images of "
            "another shape; --center_crop or --enable_bucket lets latents be computed once") in r.stdout
    assert "cache_latents: false" in open(tmp_path / "crops" / "config.yaml").read()


def test_torch_compile_trains_the_same_lora(tiny_model, instance_dir, tmp_path):
    """--torch_compile compiles the UNet in place: same parameter names, so the LoRA files, checkpoints and resume
    are untouched. With the eager backend (tracing only; inductor would take minutes on CPU) the weights are
    those of the plain run, bit for bit."""
    weights = {}
    for name, flags in (("plain", ()), ("compiled", ("--torch_compile", "--dynamo_backend", "eager"))):
        r = run_script("train_dreambooth_lora.py", *train_args(
            tiny_model["eps"], instance_dir, tmp_path / name, "--max_train_steps", "2", "--checkpointing_steps", "2",
            "--center_crop", *flags))
        assert r.returncode == 0, r.stderr[-3000:]
        weights[name] = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
        assert os.path.isfile(tmp_path / name / "checkpoint-2" / "pytorch_lora_weights.safetensors")
    plain, compiled = weights["plain"], weights["compiled"]
    assert plain.keys() == compiled.keys() and all(torch.equal(plain[k], compiled[k]) for k in plain)
    assert "torch_compile: true" in open(tmp_path / "compiled" / "config.yaml").read()
