"""Exact resume, SIGTERM checkpointing, NaN stop: the things that protect a long rented-GPU run."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, run_script, train_args

pytestmark = pytest.mark.slow


def test_resume_is_bit_exact(tiny_model, instance_dir, tmp_path):
    """2N steps in one go == N steps, then resume for N more: same LoRA tensors, bit for bit (CPU, fixed
    seed). Random flips/crops and noise all come back: data RNG is derived from (seed, epoch, index) and
    torch's RNG state is restored by accelerate. The schedule must not depend on the total (a cosine over 3
    steps is a different run from a cosine over 6), hence constant_with_warmup."""
    extra = ["--random_flip", "--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images",
             "2", "--class_generation_steps", "1", "--checkpointing_steps", "3", "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "2",
             "--gradient_accumulation_steps", "2", "--lora_dropout", "0.1", "--output_format", "diffusers"]
    full = tmp_path / "full"
    r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, full, "--class_data_dir",
                                                            tmp_path / "cls", "--max_train_steps", "6", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    half = tmp_path / "half"
    base = train_args(tiny_model["eps"], instance_dir, half, "--class_data_dir", tmp_path / "cls", *extra)
    r = run_script("train_dreambooth_lora.py", *base, "--max_train_steps", "3")
    assert r.returncode == 0, r.stderr[-3000:]
    # resume from a folder path this time ('latest' is covered in test_train_e2e)
    r = run_script("train_dreambooth_lora.py", *base, "--max_train_steps", "6", "--resume_from_checkpoint",
                   half / "checkpoint-3")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(full / "pytorch_lora_weights.safetensors")
    b = load_file(half / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = load_file(half / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # training did move the weights


def test_sigterm_saves_checkpoint(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"),
           *train_args(tiny_model["eps"], instance_dir, out, "--max_train_steps", "100000",
                       "--checkpointing_steps", "100000")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    stderr = ""
    while time.time() < deadline:  # wait for the loop to run a few steps
        line = proc.stderr.readline()
        stderr += line
        if "loss=" in line and "| 3/" in line or stderr.count("loss=") > 6:
            break
    proc.send_signal(signal.SIGTERM)
    out_text, rest = proc.communicate(timeout=120)
    stderr += rest
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "SIGTERM received" in stderr and "--resume_from_checkpoint latest" in stderr
    ckpts = [p for p in os.listdir(out) if p.startswith("checkpoint-")]
    assert len(ckpts) == 1 and not ckpts[0].endswith(".tmp")
    assert os.path.isfile(out / ckpts[0] / "pytorch_lora_weights.safetensors")



def test_second_signal_exits_at_once(monkeypatch, capsys):
    """The second signal must not wait for the step or the checkpoint (two real signals sent back to back
    are merged by the kernel, so the handler is driven directly)."""
    from dreambooth.checkpoints import GracefulStop
    exits = []
    monkeypatch.setattr(os, "_exit", exits.append)
    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        stop = GracefulStop()
        signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
        assert stop.requested == signal.SIGTERM and exits == []
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
        assert exits == [128 + signal.SIGINT]
        assert "second signal (SIGINT): exiting now" in capsys.readouterr().err
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])


def test_nan_loss_stops_with_message(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "nan"
    r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, out,
                                                            "--max_train_steps", "4", "--checkpointing_steps", "1",
                                                            "--learning_rate", "1e30", "--max_grad_norm", "1e30"))
    assert r.returncode == 3, r.stderr[-2000:]
    assert "loss is nan" in r.stderr or "loss is inf" in r.stderr
    assert "lower --learning_rate" in r.stderr and "Last good checkpoint: " in r.stderr
    # the last good checkpoint is kept, and no final LoRA file pretends the run finished
    assert os.path.isdir(out / "checkpoint-1") and not os.path.exists(out / "pytorch_lora_weights.safetensors")

    # --allow_nan_steps 2: two bad steps are skipped (weights untouched), the third stops the run
    r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, tmp_path / "nan2",
                                                            "--max_train_steps", "6", "--checkpointing_steps", "1",
                                                            "--learning_rate", "1e30", "--max_grad_norm", "1e30",
                                                            "--allow_nan_steps", "2"))
    assert r.returncode == 3, r.stderr[-2000:]
    assert r.stderr.count("step skipped") == 2 and "(2/2 allowed)" in r.stderr


def test_nan_found_at_a_later_read_names_its_step_and_saves_no_checkpoint(tiny_model, instance_dir, tmp_path):
    """Losses are read back every --logging_steps steps; a NaN found then names the step it happened at, and
    the checkpoint due at that read is not written (it would hold NaN weights)."""
    out = tmp_path / "nan-late"
    r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, out,
                                                            "--max_train_steps", "8", "--checkpointing_steps", "4",
                                                            "--logging_steps", "4", "--learning_rate", "1e30",
                                                            "--max_grad_norm", "1e30"))
    assert r.returncode == 3, r.stderr[-2000:]
    message = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(message) == 1 and " at step 2;" in message[0] and "Last good checkpoint: none" in message[0]
    assert not any(p.startswith("checkpoint-") for p in os.listdir(out))


def test_non_finite_gradient_norm_stops(tiny_model, instance_dir, tmp_path, monkeypatch, capsys):
    """A finite loss with an infinite gradient norm would still write inf/NaN into the LoRA: the run stops at
    the read. (A tiny model reaches NaN loss first at any learning rate, so the norm is made infinite here.)"""
    import accelerate
    import train_dreambooth_lora
    monkeypatch.setattr(accelerate.Accelerator, "clip_grad_norm_",
                        lambda self, parameters, max_norm, norm_type=2: torch.tensor(float("inf")))
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    try:
        code = train_dreambooth_lora.main([str(a) for a in train_args(
            tiny_model["eps"], instance_dir, tmp_path / "inf-norm", "--max_train_steps", "3", "--logging_steps", "1")])
    finally:
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps it per process
    err = capsys.readouterr().err
    assert code == 3, err[-2000:]
    assert "error: gradient norm is inf at step 1;" in err and "--allow_nan_steps" not in err
    assert not os.path.exists(tmp_path / "inf-norm" / "pytorch_lora_weights.safetensors")


def test_dead_rank_does_not_hang_the_other(tiny_model, instance_dir, tmp_path):
    """Two processes started by hand (no torchrun agent to clean up): SIGKILL rank 1 mid-training and
    rank 0 must exit non-zero, within --ddp_timeout, instead of waiting forever in a collective."""
    args = [sys.executable, os.path.join(ROOT, "train_dreambooth_lora.py"),
            *train_args(tiny_model["eps"], instance_dir, tmp_path / "out", "--max_train_steps", "100000",
                        "--checkpointing_steps", "100000", "--ddp_timeout", "30")]
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT="29541", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        procs.append(subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                      cwd=ROOT))
    try:
        seen = ""
        deadline = time.time() + 180
        while "loss=" not in seen and time.time() < deadline:
            seen += procs[0].stderr.read(200)
        assert "loss=" in seen, seen[-2000:]
        procs[1].kill()
        started = time.time()
        procs[0].communicate(timeout=120)
        assert procs[0].returncode != 0
        assert time.time() - started < 90
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_dataloader_workers_see_the_epoch(tiny_model, instance_dir, tmp_path):
    """Persistent DataLoader workers keep the dataset copy they started with, which never hears start_epoch: the
    epoch travels with each index, so random crops and flips of epoch 2 are epoch 2's with workers as without."""
    runs = {}
    for workers in ("0", "1"):
        out = tmp_path / f"w{workers}"
        r = run_script("train_dreambooth_lora.py", *train_args(
            tiny_model["eps"], instance_dir, out, "--max_train_steps", "6", "--random_flip", "--report_to", "none",
            "--dataloader_num_workers", workers, "--output_format", "diffusers"))
        assert r.returncode == 0, r.stderr[-3000:]
        runs[workers] = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(runs["0"][k], runs["1"][k]) for k in runs["0"])  # 3 images: 2 epochs of 3 steps
