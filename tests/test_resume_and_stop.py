"""A resumed run does what its command line says: every flag takes effect or is refused in one line; 'the
last good checkpoint' holds finite weights; a stop after the last step and a folder that turns read-only mid-run
end in one line that is true."""
import errno
import os
import shutil
import signal
import types

import pytest
from safetensors.torch import load_file, save_file

import train_dreambooth_lora
from conftest import train_args

pytestmark = pytest.mark.slow

LORA = "pytorch_lora_weights.safetensors"


def _train(capsys, *args):
    """(exit code, stdout + stderr)."""
    code = train_dreambooth_lora.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.fixture
def checkpointed(tiny_model, instance_dir, tmp_path, capsys):
    """Two steps at --learning_rate 1e-3 with a checkpoint at step 2; returns (output folder, base flags)."""
    out = tmp_path / "run"
    base = train_args(tiny_model["eps"], instance_dir, out, "--lr_scheduler", "constant", "--checkpointing_steps",
                      "2", "--output_format", "diffusers")
    code, err = _train(capsys, *base, "--max_train_steps", "2")
    assert code == 0, err[-2000:]
    return out, base


def _largest_change(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_flags_take_effect_on_resume_or_are_refused(checkpointed, capsys):
    """The checkpoint's optimizer and schedule state carry its learning rate: before the fix the resumed run kept
    1e-3 while config.yaml said otherwise. At 1e-12 a step cannot move the weights; at 1e-3 it does."""
    out, base = checkpointed
    start = load_file(out / "checkpoint-2" / LORA)
    # the RNG states and the data order come back from the checkpoint: a new --seed could not take effect
    code, err = _train(capsys, *base, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                       "--seed", "7")  # the last --seed wins
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"train_dreambooth_lora.py: error: --resume_from_checkpoint {out}/checkpoint-2 was saved with --seed 0; this "
        "run has --seed 7: use the same flags to resume, or start a new run in another --output_dir")
    control = out.parent / "control"
    shutil.copytree(out, control)
    code, err = _train(capsys, *base, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                       "--learning_rate", "1e-12", "--adam_weight_decay", "0")
    assert code == 0, err[-2000:]
    assert "learning rate now 1e-12 (the checkpoint's: 0.001)" in err
    assert "weight decay now 0.0 (the checkpoint's: 0.01)" in err
    assert _largest_change(load_file(out / LORA), start) < 1e-9
    assert "learning_rate: 1.0e-12" in (out / "config.yaml").read_text()

    code, err = _train(capsys, *base, "--max_train_steps", "3", "--resume_from_checkpoint",
                       control / "checkpoint-2", "--output_dir", control)
    assert code == 0, err[-2000:]
    assert "now" not in err.split("resumed from")[1].splitlines()[0]  # nothing changed: nothing said
    assert _largest_change(load_file(control / LORA), start) > 1e-5


def test_a_checkpoint_with_non_finite_weights_is_not_resumed(tiny_model, instance_dir, tmp_path, capsys):
    """A checkpoint whose LoRA file holds NaN (written by an older version, or damaged) is not 'good': resuming it
    is refused with the previous usable one offered, and the NaN stop names that one too."""
    out = tmp_path / "run"
    base = train_args(tiny_model["eps"], instance_dir, out, "--checkpointing_steps", "1", "--output_format",
                      "diffusers")
    code, err = _train(capsys, *base, "--max_train_steps", "2")
    assert code == 0, err[-2000:]
    bad = load_file(out / "checkpoint-2" / LORA)
    bad[next(iter(bad))][0] = float("nan")
    save_file(bad, out / "checkpoint-2" / LORA)
    code, err = _train(capsys, *base, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"train_dreambooth_lora.py: error: --resume_from_checkpoint {out}/checkpoint-2 is corrupt or incomplete "
        f"({LORA} holds NaN or infinite weights); resume from the previous one: --resume_from_checkpoint "
        f"{out}/checkpoint-1")


def test_weights_that_overflow_are_never_checkpointed(tiny_model, instance_dir, tmp_path, capsys):
    """The loss of step 1 is computed before its update: at --learning_rate 1e39 it reads finite while the update
    writes inf into the LoRA. The checkpoint due then is not written; the run stops with exit 3."""
    out = tmp_path / "run"
    code, err = _train(capsys, *train_args(tiny_model["eps"], instance_dir, out, "--learning_rate", "1e39",
                                           "--checkpointing_steps", "1", "--max_train_steps", "2"))
    assert code == 3
    assert ("train_dreambooth_lora.py: error: a LoRA weight is not finite at step 1; lower --learning_rate (now "
            "1e+39) or use --mixed_precision bf16. Last good checkpoint: none (start again)") in err
    assert not list(out.glob("checkpoint-*")) and not (out / LORA).exists()


def test_ctrl_c_after_the_last_step_is_acknowledged_and_honoured(tiny_model, instance_dir, tmp_path, capsys,
                                                                  monkeypatch, in_process):
    """Before: 'finishing this step and saving a checkpoint' was printed, then the final validation ran on and the
    run exited 0. Now the LoRA files are completed, the final validation is skipped, and the exit says so.
    (in_process puts the run's signal handlers back afterwards.)"""
    from dreambooth import lora_io
    save = lora_io.save_diffusers_lora

    def save_then_interrupt(*args, **kwargs):
        result = save(*args, **kwargs)
        if os.path.basename(str(args[0])) == "run":  # the final save (checkpoints save into checkpoint-N)
            signal.raise_signal(signal.SIGINT)
        return result
    monkeypatch.setattr(lora_io, "save_diffusers_lora", save_then_interrupt)
    out = tmp_path / "run"
    code, err = _train(capsys, *train_args(tiny_model["eps"], instance_dir, out, "--max_train_steps", "1",
                                           "--validation_prompt", "a photo of sks dog", "--num_validation_images",
                                           "1"))
    assert code == 128 + signal.SIGINT
    assert ("SIGINT received: writing the final LoRA files, then stopping (the final validation images and the Hub "
            "upload are skipped) (send it again to exit at once)") in err
    assert (f"stopped by signal after the last step: the LoRA files are complete in {out} (final validation images "
            "skipped)") in err
    assert (out / LORA).is_file() and (out / "README.md").is_file() and (out / "train_stats.json").is_file()
    assert not (out / "validation").exists()


def test_an_output_folder_that_turns_read_only_mid_run_is_one_line(tiny_model, instance_dir, tmp_path, capsys,
                                                                   monkeypatch):
    """The final save meets a read-only folder (simulated: the tests run as root, whom permissions do not stop):
    one line naming the file and the fix, with the checkpoint to resume from; not 'internal error'."""
    from dreambooth import files
    out = tmp_path / "run"
    real = files.tempfile

    def mkstemp(dir, prefix, suffix):
        if os.path.abspath(dir) == str(out):  # checkpoints (in checkpoint-N.tmp) still write
            raise PermissionError(errno.EACCES, "Permission denied", os.path.join(dir, prefix + "x" + suffix))
        return real.mkstemp(dir=dir, prefix=prefix, suffix=suffix)
    monkeypatch.setattr(files, "tempfile", types.SimpleNamespace(mkstemp=mkstemp))
    code, err = _train(capsys, *train_args(tiny_model["eps"], instance_dir, out, "--max_train_steps", "3",
                                           "--checkpointing_steps", "2", "--output_format", "diffusers"))
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        f"train_dreambooth_lora.py: error: {out}/.{LORA}.x.tmp: Permission denied; fix the permissions of that file "
        f"or folder (or choose another), then run the same command again with --resume_from_checkpoint "
        f"{out}/checkpoint-2")
    # at the last step the checkpoint is the result: said so, instead of a resume that has nothing to train
    shutil.rmtree(out)
    code, err = _train(capsys, *train_args(tiny_model["eps"], instance_dir, out, "--max_train_steps", "2",
                                           "--checkpointing_steps", "2", "--output_format", "diffusers"))
    assert code == 2
    assert err.strip().splitlines()[-1].endswith(
        f"then run the same command again; the trained weights are safe in {out}/checkpoint-2 (its {LORA} loads as "
        "the final file would)")
