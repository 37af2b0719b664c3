"""Inputs that pass a type check but cannot work, found before any model loads: each gets exactly one line
naming the flag or file and the fix, exit code 2, and leaves nothing behind (the output folder is not
created, or an existing one is unchanged)."""
import json
import os

import pytest
import torch
from safetensors.torch import save_file

import train_dreambooth_lora
from conftest import draw_subject, flag_argv

P = "train_dreambooth_lora.py: error: "


def snapshot(folder):
    """Every file under folder with its size and mtime: 'nothing written' means this does not change."""
    if not os.path.exists(folder):
        return None
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, files in os.walk(folder) for f in files)


def make_checkpoint(folder, step, settings=None, lora_bytes=None):
    """A checkpoint folder with the files accelerate's save_state writes for our run (torch zip archives,
    pickles, the LoRA safetensors) and the LoRA settings it was made with."""
    path = os.path.join(folder, f"checkpoint-{step}")
    os.makedirs(path)
    for name in ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl"):
        torch.save({"step": step}, os.path.join(path, name))
    save_file({"unet.a.lora.down.weight": torch.zeros(4, 8)}, os.path.join(path, "pytorch_lora_weights.safetensors"))
    if lora_bytes is not None:
        with open(os.path.join(path, "pytorch_lora_weights.safetensors"), "r+b") as f:
            f.truncate(lora_bytes)
    settings = settings or {"rank": 4, "lora_alpha": 4, "use_dora": False, "train_text_encoder": False,
                            "lora_target_modules": "to_k,to_out.0,to_q,to_v"}
    with open(os.path.join(path, "lora_settings.json"), "w") as f:
        json.dump(settings, f)
    return path


@pytest.fixture
def world(tmp_path, tiny_model):
    dog = tmp_path / "dog"
    dog.mkdir()
    for i in range(2):
        draw_subject(dog / f"dog{i}.png", shift=i)
    out = tmp_path / "out"

    def argv(*extra, **overrides):
        base = {"pretrained_model_name_or_path": tiny_model["eps"], "instance_data_dir": str(dog),
                "instance_prompt": "a photo of sks dog", "output_dir": str(out), "resolution": "64"}
        return flag_argv(base, *extra, **overrides)
    return tmp_path, dog, out, argv


def fails_with(world, capsys, line, *extra, **overrides):
    tmp_path, dog, out, argv = world
    before = snapshot(out)
    code = train_dreambooth_lora.main(argv(*extra, **overrides))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err == [P + line]
    assert snapshot(out) == before


def text_file(name, content="version https://git-lfs.github.com/spec/v1\n"):
    def make(t):
        (t / name).write_text(content)
        return str(t / name)
    return make


def truncated_safetensors(t):
    save_file({"w": torch.zeros(64, 64)}, str(t / "model.safetensors"))
    with open(t / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    return str(t / "model.safetensors")


VALUE_CASES = [  # (id, overrides, exact line after the prefix; "{t}" is tmp_path)
    ("nan learning rate", {"learning_rate": "nan"}, "argument --learning_rate: nan is not a finite number"),
    ("inf prior weight", {"prior_loss_weight": "inf"}, "argument --prior_loss_weight: inf is not a finite number"),
    ("negative prior weight", {"prior_loss_weight": "-1"}, "--prior_loss_weight must be >= 0 (got -1.0)"),
    ("nan noise offset", {"noise_offset": "NaN"}, "argument --noise_offset: NaN is not a finite number"),
    ("beta2 of 1", {"adam_beta2": "1"}, "--adam_beta2 must be in [0, 1) (got 1.0)"),
    ("zero grad norm", {"max_grad_norm": "0"}, "--max_grad_norm must be > 0 (got 0.0)"),
    ("seed too large", {"seed": "5000000000"},
     "argument --seed: 5000000000 is outside 0..4294967295 (the range numpy and torch both accept)"),
    ("negative seed", {"seed": "-1"}, "argument --seed: -1 is outside 0..4294967295 (the range numpy and torch both accept)"),
    ("int given a float", {"rank": "4.5"}, "argument --rank: invalid int value: '4.5'"),
    ("token length 0", {"tokenizer_max_length": "0"}, "--tokenizer_max_length must be >= 1 (got 0)"),
    ("whitespace instance prompt", {"instance_prompt": "   "},
     "--instance_prompt is empty or only whitespace; give a prompt, e.g. 'a photo of sks dog'"),
    ("whitespace class prompt", {"with_prior_preservation": True, "class_prompt": "\t"},
     "--class_prompt is empty or only whitespace; give a prompt, e.g. 'a photo of sks dog'"),
    ("empty validation prompt", {"validation_prompt": ""},
     "--validation_prompt is empty or only whitespace; give a prompt, e.g. 'a photo of sks dog'"),
    ("empty output dir", {"output_dir": ""},
     "--output_dir is empty; give a folder path, e.g. --output_dir work_dirs/sd15_dog"),
    ("IF validation images", {"validation_images": "a.png"},
     "--validation_images is a DeepFloyd IF option of diffusers' script; this trainer supports Stable Diffusion "
     "only: drop the flag"),
    ("IF class labels", {"class_labels_conditioning": "timesteps"},
     "--class_labels_conditioning is a DeepFloyd IF option of diffusers' script; this trainer supports Stable "
     "Diffusion only: drop the flag"),
    ("text file named .ckpt", {"pretrained_model_name_or_path": text_file("model.ckpt")},
     "--pretrained_model_name_or_path {t}/model.ckpt is not a torch checkpoint (neither zip nor pickle; a text or "
     "HTML file saved under that name?); download or convert it again"),
    ("text file named .safetensors", {"pretrained_model_name_or_path": text_file("model.safetensors")},
     "--pretrained_model_name_or_path {t}/model.safetensors is not a safetensors file (no valid header; a text or "
     "HTML file saved under that name?); download or convert it again"),
    ("truncated .safetensors", {"pretrained_model_name_or_path": truncated_safetensors},
     "--pretrained_model_name_or_path {t}/model.safetensors is truncated (1000 of 16456 bytes); download or convert it again"),
    ("empty .ckpt", {"pretrained_model_name_or_path": text_file("empty.ckpt", "")},
     "--pretrained_model_name_or_path {t}/empty.ckpt is not a torch checkpoint (neither zip nor pickle; a text or "
     "HTML file saved under that name?); download or convert it again"),
    ("bare checkpoint name not there", {"resume_from_checkpoint": "checkpoint-40"},
     "--resume_from_checkpoint checkpoint-40: folder does not exist (nor in --output_dir {t}/out); use 'latest', "
     "a checkpoint-N name or an output_dir/checkpoint-N path"),
    ("hub without push, offline", {"push_to_hub": True},
     "--push_to_hub: HF_HUB_OFFLINE=1 is set, so nothing can be uploaded; unset HF_HUB_OFFLINE, or drop "
     "--push_to_hub and upload output_dir later with `hf upload`"),
]


@pytest.mark.parametrize("name,overrides,line", VALUE_CASES, ids=[c[0] for c in VALUE_CASES])
def test_unusable_value_is_one_line(world, capsys, monkeypatch, name, overrides, line):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp_path = world[0]
    resolved = {k: (v(tmp_path) if callable(v) else v) for k, v in overrides.items()}
    fails_with(world, capsys, line.format(t=tmp_path), **resolved)


def test_config_file_values_go_through_the_parser(world, capsys):
    """A config file is read like the command line: "false" is false, 4.5 is no int, choices and NaN refused, and
    every on/off flag can be turned off again on the command line."""
    from dreambooth.config import parse_args
    tmp_path, dog, out, argv = world
    config = tmp_path / "c.yaml"
    config.write_text('center_crop: "false"\nrandom_flip: "yes"\ncache_latents: true\nrank: 8\n'
                      'lora_target_modules: [to_q, to_v]\nclass_data_dir: ~/classes\n')
    args = parse_args(argv("--config", config, "--no-cache_latents"))
    assert (args.center_crop, args.random_flip, args.cache_latents, args.rank) == (False, True, False, 8)
    assert args.lora_target_modules == "to_q,to_v" and args.class_data_dir == os.path.expanduser("~/classes")
    for text, line in [("rank: 4.5\n", "argument --rank: invalid int value: '4.5'"),
                       ("lr_scheduler: cosine_annealing\n", "argument --lr_scheduler: invalid choice: "
                        "'cosine_annealing' (choose from 'linear', 'cosine', 'cosine_with_restarts', 'polynomial', "
                        "'constant', 'constant_with_warmup')"),
                       ("learning_rate: .nan\n", "argument --learning_rate: nan is not a finite number"),
                       ("center_crop: maybe\n", "center_crop: expected true or false, got 'maybe'"),
                       ("instance_prompt: [a, b]\n", "instance_prompt: expected one value, got list ['a', 'b']"),
                       ("learning_rat: 1\n", "unknown key 'learning_rat' (keys are flag names without --)")]:
        config.write_text(text)
        fails_with(world, capsys, f"--config {config}: {line}", "--config", config)


def test_paths_expand_user_and_variables(world, monkeypatch):
    from dreambooth.config import parse_args
    tmp_path, dog, out, argv = world
    monkeypatch.setenv("DOGS", str(dog))
    monkeypatch.setenv("HOME", str(tmp_path))
    args = parse_args(argv(instance_data_dir="$DOGS", output_dir="~/runs/x"))
    assert args.instance_data_dir == str(dog) and args.output_dir == str(tmp_path / "runs" / "x")


def test_output_folder_not_writable(world, capsys, monkeypatch):
    """Checked before loading (as root the permission bits do not stop us, hence os.access is what we ask)."""
    tmp_path = world[0]
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    fails_with(world, capsys, f"--output_dir {locked}/run: {locked} is not writable by this user; choose another "
               "folder or fix its permissions", output_dir=str(locked / "run"))


def test_finished_run_is_not_overwritten(world, capsys):
    tmp_path, dog, out, argv = world
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"finished")
    fails_with(world, capsys, f"--output_dir {out} already holds a finished run (pytorch_lora_weights.safetensors); "
               "choose another folder, add --overwrite_output_dir to replace it, or continue it with "
               "--resume_from_checkpoint latest and a higher --max_train_steps")


def test_unreadable_class_image_and_bad_captions(world, capsys):
    tmp_path, dog, out, argv = world
    classes = tmp_path / "classes"
    classes.mkdir()
    (classes / "mine.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    fails_with(world, capsys, f"--class_data_dir: cannot read image {classes}/mine.jpg (UnidentifiedImageError: "
               f"cannot identify image file '{classes}/mine.jpg'); fix or remove the file",
               with_prior_preservation=True, class_prompt="a photo of dog", class_data_dir=str(classes))
    (dog / "dog0.txt").write_bytes("a photo of sks dog, caf\u00e9".encode("utf-16"))  # with BOM: read fine
    (dog / "dog1.txt").write_bytes("caf\u00e9".encode("latin-1"))
    fails_with(world, capsys, f"caption file {dog}/dog1.txt: not UTF-8 or UTF-16 text (byte 0xe9 at offset 3: "
               "unexpected end of data); save it as UTF-8")
    (dog / "dog1.txt").write_text("  \n")
    fails_with(world, capsys, f"caption file {dog}/dog1.txt is empty; write a caption in it, or delete it to use "
               "--instance_prompt for that image")


# ---- resuming: resolved and checked before the model loads ---------------------------------------------------

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


# ---- how the command ends -----------------------------------------------------------------------------------

def test_bug_gets_a_short_line_and_debug_the_traceback(world, capsys, monkeypatch):
    def broken(*a, **k):
        raise RuntimeError("something inside\nwith a second line")
    monkeypatch.setattr(train_dreambooth_lora, "train", broken)
    argv = world[3]
    assert train_dreambooth_lora.main(argv()) == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        "train_dreambooth_lora.py: internal error: RuntimeError: something inside -- this is a bug: rerun the same "
        "command with --debug (or DREAMBOOTH_DEBUG=1) and report it with that traceback (docs/troubleshooting.md, 'Reporting a bug')"]
    with pytest.raises(RuntimeError, match="something inside"):
        train_dreambooth_lora.main(argv("--debug"))
    monkeypatch.setenv("DREAMBOOTH_DEBUG", "1")
    with pytest.raises(RuntimeError):
        train_dreambooth_lora.main(argv())


def test_help_opens_with_purpose_example_and_required_flags_and_shows_each_default_once(capsys):
    from dreambooth.config import build_parser
    parser = build_parser()
    text = parser.format_help()
    head = text.split("options:")[0]
    assert head.startswith("usage: train_dreambooth_lora.py --pretrained_model_name_or_path MODEL "
                           "--instance_data_dir DIR --instance_prompt PROMPT [options]")
    assert "Teach a Stable Diffusion model one subject" in head and "accelerate launch train_dreambooth_lora.py" in head
    assert "required: --pretrained_model_name_or_path, --instance_data_dir (or --dataset_name), --instance_prompt" in head
    formatter = parser._get_formatter()
    for action in parser._actions:
        rendered = formatter._get_help_string(action) or ""
        assert rendered.lower().count("default") <= 1, (action.dest, rendered)
    assert ("Learning rate of the denoiser's LoRA (default: the family's, as diffusers' scripts: 5e-4 for SD 1.x/2.x "
            "and SDXL, 1e-4 for SD 3)." in " ".join(text.split()))


def test_review_cases_are_one_line_too(world, capsys, tiny_model):
    """Corrupt model configs and run files, flags of another family, and the --conf abbreviation."""
    import shutil
    tmp_path, dog, out, argv = world
    model = tmp_path / "model"
    shutil.copytree(tiny_model["eps"], model)
    (model / "model_index.json").write_text('{"_class_name": "StableDiff')
    code = train_dreambooth_lora.main(argv(pretrained_model_name_or_path=str(model)))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and not out.exists()
    assert err[0].startswith(P + f"--pretrained_model_name_or_path {model}: cannot load its model_index.json "
                                 "(JSONDecodeError: ")
    fails_with(world, capsys, f"--crops_coords_top_left_h is an SDXL flag; --pretrained_model_name_or_path "
               f"{tiny_model['eps']} is "
               "SD 1.x/2.x: drop it", crops_coords_top_left_h="8")
    fails_with(world, capsys, "--output_kohya_format asks for the kohya file, which --output_format diffusers leaves "
               "out; drop one of them (the default --output_format both writes it)", output_kohya_format=True,
               output_format="diffusers")
    first, latest = make_checkpoint(str(out), 2), make_checkpoint(str(out), 4)
    with open(os.path.join(latest, "lora_settings.json"), "w") as f:
        f.write('{"rank": 4, "lora_')
    fails_with(world, capsys, f"--resume_from_checkpoint {latest} is corrupt or incomplete (lora_settings.json is "
               f"not readable JSON); resume from the previous one: --resume_from_checkpoint {first}",
               resume_from_checkpoint="latest")
    from dreambooth.config import parse_args
    (tmp_path / "c.yaml").write_text("rank: 9\n")
    assert parse_args(argv("--conf", tmp_path / "c.yaml")).rank == 9  # argparse's abbreviation finds the file too
