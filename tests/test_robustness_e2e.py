"""Failures that can only be known once the model loads, signals through real launchers, and the Hub push
against a fake endpoint: one line, the right exit code, nothing half-written."""
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, run_script, train_args

pytestmark = pytest.mark.slow
P = "train_dreambooth_lora.py: error: "


def one_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_corrupt_model_weights(tiny_model, instance_dir, tmp_path, in_process, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model["eps"], model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = tmp_path / "out"
    assert in_process(train_args(str(model), instance_dir, str(out))) == 2
    line = one_line(capsys)
    assert line.startswith(P + f"--pretrained_model_name_or_path {model}: cannot load its unet (OSError: ")
    assert line.endswith("); its files are missing or corrupt: download or convert the model again")
    assert not out.exists()
    weights.unlink()
    assert in_process(train_args(str(model), instance_dir, str(out))) == 2
    assert one_line(capsys) == P + (f"--pretrained_model_name_or_path {model}: cannot load its unet (OSError: Error no "
                                    f"file named diffusion_pytorch_model.bin found in directory {model}.); its files "
                                    "are missing or corrupt: download or convert the model again")


def test_hub_id_offline_and_single_file_that_is_no_model(tiny_model, instance_dir, tmp_path, in_process, capsys):
    out = tmp_path / "out"
    assert in_process(train_args("someone/not-cached", instance_dir, str(out))) == 2
    assert one_line(capsys) == P + ("--pretrained_model_name_or_path someone/not-cached: cannot load its "
                                    "model_index.json: it is not in the local cache and HF_HUB_OFFLINE=1 is set; "
                                    "unset HF_HUB_OFFLINE, or download it first (hf download someone/not-cached)")
    import torch
    from safetensors.torch import save_file
    save_file({"some.weight": torch.zeros(3)}, str(tmp_path / "lora.safetensors"))
    assert in_process(train_args(str(tmp_path / "lora.safetensors"), instance_dir, str(out),
                                 "--single_file_config", tiny_model["eps"])) == 2
    line = one_line(capsys)
    assert line.startswith(P + f"--pretrained_model_name_or_path {tmp_path}/lora.safetensors: cannot load its "
                               "single-file checkpoint (")
    assert line.endswith("); its files are missing or corrupt: download or convert the model again")
    assert not out.exists()


def test_lora_target_peft_cannot_wrap(tiny_model, instance_dir, tmp_path, in_process, capsys):
    out = tmp_path / "out"
    assert in_process(train_args(tiny_model["eps"], instance_dir, str(out), "--lora_target_modules", "to_q,attn1")) == 2
    assert one_line(capsys) == P + ("--lora_target_modules: attn1 is of type Attention, and LoRA wraps only Linear, "
                                    "Conv and Embedding layers; name the layers inside it instead: attn1.to_k, "
                                    "attn1.to_q, attn1.to_v")
    assert not out.exists()


def test_resolution_follows_the_model(tiny_model, instance_dir, tmp_path, in_process, capsys):
    """An SD-like model (8x VAE, 2-level UNet) takes multiples of 16 only; the 4x test model trains at 32 px."""
    from make_tiny_model import build_tiny_pipeline
    sd_like = tmp_path / "sd-like"
    build_tiny_pipeline(vae_channels=(32, 32, 64, 64)).save_pretrained(sd_like)
    out = tmp_path / "out"
    assert in_process(train_args(str(sd_like), instance_dir, str(out), "--resolution", "40")) == 2
    assert one_line(capsys) == P + ("--resolution 40 is not a multiple of 16, the smallest size step this model "
                                    "takes; use 32 or 48")
    assert not out.exists()
    assert in_process(train_args(tiny_model["eps"], instance_dir, str(out), "--resolution", "32",
                                 "--max_train_steps", "1", "--report_to", "none")) == 0
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


def test_overwrite_output_dir(tiny_model, instance_dir, tmp_path, in_process, capsys):
    out = tmp_path / "out"
    base = train_args(tiny_model["eps"], instance_dir, str(out), "--max_train_steps", "2", "--checkpointing_steps",
                      "1", "--report_to", "none")
    assert in_process(base) == 0
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    capsys.readouterr()
    assert in_process(base) == 2 and "already holds a finished run" in one_line(capsys)
    assert in_process(base[:-6] + ["--max_train_steps", "1", "--checkpointing_steps", "5",
                                   "--overwrite_output_dir"]) == 0
    assert not any(p.startswith("checkpoint") for p in os.listdir(out))  # the old run's checkpoints are gone


def test_files_follow_the_umask(tiny_model, instance_dir, tmp_path, in_process):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert in_process(train_args(tiny_model["eps"], instance_dir, str(out), "--max_train_steps", "1",
                                     "--report_to", "none")) == 0
    finally:
        os.umask(old)
    for name in ("pytorch_lora_weights.safetensors", "out.safetensors", "README.md", "config.yaml", "loss.png",
                 "train_stats.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o644, name


def wait_for(proc, text, timeout=180):
    """Read the process's stderr until `text` appears; returns what was read."""
    seen, deadline = "", time.time() + timeout
    while text not in seen and time.time() < deadline:
        chunk = proc.stderr.read(1) if proc.poll() is None else proc.stderr.read()
        if not chunk:
            break
        seen += chunk
    assert text in seen, seen[-2000:]
    return seen


def test_sigterm_to_the_accelerate_launcher_checkpoints(tiny_model, instance_dir, tmp_path):
    """`accelerate launch` (one process) does not pass SIGTERM on: the trainer asks the kernel for a SIGTERM when
    its parent dies, so killing the launcher still ends in a checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train_dreambooth_lora.py"),
           *train_args(tiny_model["eps"], instance_dir, out, "--max_train_steps", "100000", "--checkpointing_steps",
                       "100000", "--report_to", "none")]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
    seen = wait_for(launcher, "| 3/")
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=30)
    seen += launcher.stderr.read()  # EOF only once the trainer (holding the pipe too) has exited
    assert "SIGTERM received" in seen and "checkpoint saved to" in seen, seen[-2000:]
    assert "--resume_from_checkpoint latest" in seen
    ckpts = [p for p in os.listdir(out) if p.startswith("checkpoint-")]
    assert len(ckpts) == 1 and os.path.isfile(out / ckpts[0] / "pytorch_lora_weights.safetensors")


def test_ctrl_c_during_class_generation(tiny_model, instance_dir, tmp_path):
    out, classes = tmp_path / "run", tmp_path / "classes"
    cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"),
           *train_args(tiny_model["eps"], instance_dir, out, "--with_prior_preservation", "--class_prompt",
                       "a photo of dog", "--class_data_dir", classes, "--num_class_images", "200",
                       "--sample_batch_size", "1", "--class_generation_steps", "2", "--report_to", "none")]
    # Ctrl-C as a terminal sends it: Python turns SIGINT into KeyboardInterrupt only when SIGINT is not ignored at
    # start, and a suite launched in the background by a non-interactive shell (`make test &`) passes it ignored
    proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    wait_for(proc, "Generating 200 class images")
    deadline = time.time() + 60
    while time.time() < deadline and len(os.listdir(classes)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"train_dreambooth_lora.py: interrupted while generating class images; "
                                            f"the finished ones are kept in {classes} and the same command continues "
                                            "from there")
    kept = [p for p in os.listdir(classes) if p.endswith(".png")]
    assert 2 <= len(kept) < 200 and not (out / "pytorch_lora_weights.safetensors").exists()


# ---- --push_to_hub against a fake Hub on 127.0.0.1 -------------------------------------------------------------

def push(tiny_model, instance_dir, out, hub, *extra):
    return run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, out,
                                                               "--max_train_steps", "2", "--checkpointing_steps", "1",
                                                               "--report_to", "none", "--push_to_hub",
                                                               "--hub_token", "secret-token", *extra),
                      env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"})


def test_push_to_hub_uploads_the_run(tiny_model, instance_dir, tmp_path, fake_hub):
    out = tmp_path / "dog-lora"
    r = push(tiny_model, instance_dir, out, fake_hub)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"uploaded {out} to {fake_hub.endpoint}/fake-user/dog-lora" in r.stdout
    files = fake_hub.repos["fake-user/dog-lora"]
    assert {"pytorch_lora_weights.safetensors", "dog-lora.safetensors", "README.md", "config.yaml"} <= set(files)
    assert not any(p.startswith(("checkpoint-", "logs/")) for p in files)
    assert files["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert b"secret-token" not in files["README.md"] and b"secret-token" not in files["config.yaml"]


def test_push_to_hub_bad_token_fails_before_training(tiny_model, instance_dir, tmp_path, fake_hub):
    fake_hub.reject_tokens = True
    out = tmp_path / "dog-lora"
    started = time.time()
    r = push(tiny_model, instance_dir, out, fake_hub)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [P + (
        f"--hub_token: {fake_hub.endpoint} refused the token (401 Unauthorized) while preparing dog-lora; pass a write "
        "token with --hub_token or run `hf auth login` (https://huggingface.co/settings/tokens)")]
    assert not out.exists() and time.time() - started < 30


def test_push_to_hub_failed_upload_keeps_everything(tiny_model, instance_dir, tmp_path, fake_hub):
    fake_hub.fail_commits = 500
    out = tmp_path / "dog-lora"
    r = push(tiny_model, instance_dir, out, fake_hub)
    assert r.returncode == 4, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("--push_to_hub: upload to fake-user/dog-lora failed: ")
    assert f"nothing was deleted, the files are still in {out}; retry with: hf upload fake-user/dog-lora {out} ." in line
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors") and os.path.isdir(out / "checkpoint-2")


def test_unreachable_hub_is_one_line_in_seconds(instance_dir, tmp_path):
    """No network: one line naming the endpoint and the fix, not half a minute of retries and their log lines."""
    started = time.time()
    r = run_script("train_dreambooth_lora.py", *train_args("someone/sd-model", instance_dir, tmp_path / "out"),
                   env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [P + (
        "--pretrained_model_name_or_path someone/sd-model: cannot reach the Hugging Face Hub to download it "
        "(http://127.0.0.1:9: Connection refused); check the network, or point the flag at a local folder")]
    assert time.time() - started < 25 and not (tmp_path / "out").exists()
