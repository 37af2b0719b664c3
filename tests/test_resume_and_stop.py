"""Checkpoints and resuming: which checkpoint 'latest' or a bare checkpoint-N name means (incomplete saves
ignored); a checkpoint that is corrupt, of other LoRA settings, past the end or of a finished run refused in one
line before the model loads; a resumed run does what its command line says (every flag takes effect or is refused
in one line); 'the last good checkpoint' holds finite weights; a stop after the last step and a folder that turns
read-only mid-run end in one line that is true. Signals that checkpoint a running run are in test_reliability.py."""
import errno
import json
import os
import shutil
import signal
import types

import pytest
from safetensors.torch import load_file, save_file

import train_dreambooth_lora
from conftest import fails_with, make_checkpoint, train_args

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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# ---- which checkpoint a resume means, and the checks on it before the model loads ------------------------------


def test_checkpoint_listing_ignores_incomplete_saves(tmp_path):
    from dreambooth.checkpoints import latest, list_checkpoints
    for name in ("checkpoint-2", "checkpoint-10", "checkpoint-12.tmp", "checkpoint-x", "other"):
        os.makedirs(tmp_path / name)
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["checkpoint-2", "checkpoint-10"]
    assert latest(str(tmp_path)).endswith("checkpoint-10")
    assert latest(str(tmp_path / "none")) is None



def test_resume_names_resolve_like_diffusers(world):
    from argparse import Namespace
    from dreambooth.checkpoints import check_resume
    out = str(world[2])
    first, second = make_checkpoint(out, 2), make_checkpoint(out, 10)
    ns = dict(output_dir=out, max_train_steps=None, rank=4, lora_alpha=None, use_dora=False,
              train_text_encoder=False, lora_target_modules="to_q,to_k,to_v,to_out.0")
    assert check_resume(Namespace(resume_from_checkpoint="latest", **ns)) == second
    assert check_resume(Namespace(resume_from_checkpoint="checkpoint-2", **ns)) == first  # diffusers' bare name
    assert check_resume(Namespace(resume_from_checkpoint=first, **ns)) == first
    assert check_resume(Namespace(resume_from_checkpoint="latest", **dict(ns, output_dir=out + "-new"))) is None


@pytest.mark.parametrize("damage,problem", [
    ("truncate", "pytorch_lora_weights.safetensors is truncated (100 of 216 bytes)"),
    ("no optimizer", "optimizer.bin is missing"),
    ("empty scheduler", "scheduler.bin is empty"),
    ("cut optimizer", "optimizer.bin is truncated or not a torch file"),
])
def test_corrupt_checkpoint_offers_the_previous_one(world, capsys, damage, problem):
    out = str(world[2])
    first = make_checkpoint(out, 2)
    latest = make_checkpoint(out, 4, lora_bytes=100 if damage == "truncate" else None)
    if damage == "no optimizer":
        os.remove(os.path.join(latest, "optimizer.bin"))
    elif damage == "empty scheduler":
        open(os.path.join(latest, "scheduler.bin"), "w").close()
    elif damage == "cut optimizer":
        with open(os.path.join(latest, "optimizer.bin"), "r+b") as f:
            f.truncate(40)
    fails_with(world, capsys, f"--resume_from_checkpoint {latest} is corrupt or incomplete ({problem}); resume from "
               f"the previous one: --resume_from_checkpoint {first}", resume_from_checkpoint="latest")


def test_checkpoint_of_other_lora_settings_names_the_flags(world, capsys):
    out = str(world[2])
    path = make_checkpoint(out, 2, {"rank": 8, "lora_alpha": 8, "use_dora": False, "train_text_encoder": True,
                                    "lora_target_modules": "to_k,to_out.0,to_q,to_v"})
    fails_with(world, capsys, f"--resume_from_checkpoint {path} was saved with --rank 8, --lora_alpha 8, "
               "--train_text_encoder; this run has --rank 4, --lora_alpha 4, no --train_text_encoder: use the same "
               "flags to resume, or start a new run in another --output_dir", resume_from_checkpoint="latest")


def test_checkpoint_past_or_at_the_end(world, capsys):
    out = str(world[2])
    path = make_checkpoint(out, 6)
    fails_with(world, capsys, f"--resume_from_checkpoint {path} is at step 6, past --max_train_steps 4; raise "
               "--max_train_steps to train on, or resume an earlier checkpoint", resume_from_checkpoint=path,
               max_train_steps=4)
    fails_with(world, capsys, f"--resume_from_checkpoint {path} is already at --max_train_steps 6: the run is "
               "finished; raise --max_train_steps to train further", resume_from_checkpoint="latest",
               max_train_steps=6)


def test_finished_run_resumed_again(world, capsys):
    """The last checkpoint (4) is before the end (6), but the run finished: say so instead of training 4..6 again."""
    out = world[2]
    make_checkpoint(str(out), 4)
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    (out / "train_stats.json").write_text(json.dumps({"final_step": 6}))
    fails_with(world, capsys, f"--resume_from_checkpoint latest: the run in {out} already finished at step 6 "
               "(--max_train_steps 6); raise --max_train_steps to train further", resume_from_checkpoint="latest",
               max_train_steps=6)
