"""Exact resume, SIGTERM checkpointing, NaN stop: the things that protect a long rented-GPU run. Signals are sent
as a machine or a user sends them: to the trainer, to a one-process `accelerate launch` (whose child must still
checkpoint), and Ctrl-C while class images are generated (the finished ones kept); a dead rank does not hang the
other, and DataLoader workers see the same epoch as the main process."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import HANG_GUARD, ROOT, MachineClock, read_until, run_script, train_args

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
    stderr = ""
    while True:  # wait for the loop to run a few steps (or the run to end: the asserts below then say why)
        line = read_until(proc, lambda seen: seen.endswith(("\n", "\r")))
        stderr += line
        if not line or "loss=" in line and "| 3/" in line or stderr.count("loss=") > 6:
            break
    proc.send_signal(signal.SIGTERM)
    out_text, rest = proc.communicate(timeout=HANG_GUARD)
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
        seen = read_until(procs[0], lambda seen: "loss=" in seen)
        assert "loss=" in seen, seen[-2000:]
        procs[1].kill()
        with MachineClock() as clock:
            procs[0].communicate(timeout=HANG_GUARD)
        assert procs[0].returncode != 0
        assert clock.seconds < clock.budget(90)
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


# ---- signals through real launchers and during class generation ------------------------------------------------


def wait_for(proc, text):
    """Read the process's stderr until `text` appears (or it exits); returns what was read."""
    seen = read_until(proc, lambda seen: text in seen)
    assert text in seen, seen[-2000:]
    return seen


def test_sigterm_to_the_accelerate_launcher_checkpoints(tiny_model, instance_dir, tmp_path):
    """Killing a one-process `accelerate launch` ends in a checkpoint: where the launcher does not pass SIGTERM on,
    the trainer asks the kernel for a SIGTERM when its parent dies; accelerate 1.16's launcher passes it on and
    SIGKILLs the trainer 5 s later. tests/patient_launcher.py is that launcher without the 5 s, which a loaded
    machine can need for the step and the checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "tests", "patient_launcher.py"), "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", os.path.join(ROOT, "train_dreambooth_lora.py"),
           *train_args(tiny_model["eps"], instance_dir, out, "--max_train_steps", "100000", "--checkpointing_steps",
                       "100000", "--report_to", "none")]
    launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1"))
    seen = wait_for(launcher, "| 3/")
    launcher.send_signal(signal.SIGTERM)
    launcher.wait(timeout=HANG_GUARD)
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
    guard = time.monotonic() + HANG_GUARD
    while len(os.listdir(classes)) < 2 and proc.poll() is None and time.monotonic() < guard:  # two written
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=HANG_GUARD)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == (f"train_dreambooth_lora.py: interrupted while generating class images; "
                                            f"the finished ones are kept in {classes} and the same command continues "
                                            "from there")
    kept = [p for p in os.listdir(classes) if p.endswith(".png")]
    assert 2 <= len(kept) < 200 and not (out / "pytorch_lora_weights.safetensors").exists()
