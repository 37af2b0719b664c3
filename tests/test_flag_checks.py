"""Flag values and combinations that cannot work, refused before any model weights load: each is exactly one line
naming the flag or file and the fix, exit code 2, and nothing written (the output folder not created, or an existing
one unchanged); warnings that do not stop a run; run_cli's bug line for what is not the user's mistake. Most cases
call main() in this process with the tiny SD model's folder, whose config files the family checks read; the
config-file parser is in test_config.py, model-load failures in test_model_load_errors.py, resume checks in
test_resume_and_stop.py and output-folder checks in test_output_safety.py."""
import os

import pytest
import torch
from safetensors.torch import save_file

import train_dreambooth_lora
from conftest import MachineClock, draw_subject, fails_with, make_checkpoint, run_script

P = "train_dreambooth_lora.py: error: "


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



@pytest.fixture
def setup(world):
    """conftest's world, with a file beside the photos that is no image (skipped, never an error)."""
    (world[1] / "notes.md").write_text("not an image")
    return world


def make_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def make_no_images(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("x")
    return str(tmp_path / "docs")


def make_corrupt(tmp_path):
    folder = tmp_path / "corrupt"
    folder.mkdir()
    draw_subject(folder / "good.png")
    data = open(draw_subject(folder / "tmp.jpg", size=(256, 256)), "rb").read()
    (folder / "broken.jpg").write_bytes(data[: len(data) // 3])
    os.remove(folder / "tmp.jpg")
    return str(folder)


def make_stray_caption(tmp_path):
    folder = tmp_path / "captions"
    folder.mkdir()
    draw_subject(folder / "dog.png")
    (folder / "cat.txt").write_text("a photo of sks cat")
    return str(folder)


def make_dataset_folder(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    draw_subject(folder / "0.png")
    (folder / "metadata.csv").write_text("file_name,text\n0.png,a dog\n")
    return str(folder)


CASES = [  # (name, overrides (callables get tmp_path), words the one-line message must contain)
    ("missing instance dir", {"instance_data_dir": "/nonexistent/dog"}, ["--instance_data_dir", "does not exist"]),
    ("empty instance dir", {"instance_data_dir": make_empty}, ["--instance_data_dir", "is empty"]),
    ("no images", {"instance_data_dir": make_no_images}, ["--instance_data_dir", "has no images"]),
    ("corrupt image", {"instance_data_dir": make_corrupt}, ["broken.jpg", "fix or remove"]),
    ("stray caption", {"instance_data_dir": make_stray_caption}, ["cat.txt", "no image of the same name"]),
    ("prior without class prompt", {"with_prior_preservation": True}, ["--with_prior_preservation", "--class_prompt"]),
    ("num_class_images < 1", {"with_prior_preservation": True, "class_prompt": "dog", "num_class_images": 0},
     ["--num_class_images", ">= 1"]),
    ("resolution not multiple of 8", {"resolution": 100}, ["--resolution", "multiple of 8"]),
    ("resolution zero", {"resolution": 0}, ["--resolution", "positive multiple of 8"]),
    ("batch size 0", {"train_batch_size": 0}, ["--train_batch_size", ">= 1"]),
    ("lr zero", {"learning_rate": 0}, ["--learning_rate", "> 0"]),
    ("lr negative", {"learning_rate": -1e-4}, ["--learning_rate", "> 0"]),
    ("unknown scheduler", {"lr_scheduler": "cosine_annealing"}, ["--lr_scheduler", "invalid choice"]),
    ("resume path missing", {"resume_from_checkpoint": "/nonexistent/checkpoint-5"},
     ["--resume_from_checkpoint", "does not exist"]),
    ("output_dir is a file", {"output_dir": lambda t: (t / "file.txt").write_text("x") and str(t / "file.txt")},
     ["--output_dir", "is a file"]),
    ("model path missing", {"pretrained_model_name_or_path": "./models/sd15"},
     ["--pretrained_model_name_or_path", "no such file or folder"]),
    ("model folder not diffusers", {"pretrained_model_name_or_path": make_empty},
     ["--pretrained_model_name_or_path", "model_index.json"]),
    ("model file wrong type", {"pretrained_model_name_or_path": lambda t: (t / "m.txt").write_text("x") and str(t / "m.txt")},
     ["--pretrained_model_name_or_path", ".safetensors"]),
    ("rank 0", {"rank": 0}, ["--rank", ">= 1"]),
    ("no instance prompt", {"instance_prompt": None}, ["--instance_prompt", "required"]),
    ("text encoder + precomputed", {"train_text_encoder": True, "pre_compute_text_embeddings": True},
     ["--pre_compute_text_embeddings", "--train_text_encoder"]),
    ("bucket steps", {"enable_bucket": True, "bucket_reso_steps": 12}, ["--bucket_reso_steps", "multiple of 8"]),
    ("unknown tracker", {"report_to": "mlflow"}, ["--report_to mlflow", "unknown tracker"]),
    ("dataset and folder", {"dataset_name": make_dataset_folder}, ["--dataset_name", "--instance_data_dir", "not both"]),
    ("dataset column", {"instance_data_dir": None, "dataset_name": make_dataset_folder, "caption_column": "caption"},
     ["--caption_column caption", "no such column", "text"]),
    ("bad config key", {"config": lambda t: (t / "c.yaml").write_text("learning_rat: 1\n") and str(t / "c.yaml")},
     ["--config", "unknown key 'learning_rat'"]),
]


@pytest.mark.parametrize("name,overrides,words", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast(setup, capsys, name, overrides, words):
    tmp_path, dog, out, argv = setup
    resolved = {k: (v(tmp_path) if callable(v) else v) for k, v in overrides.items()}
    code = train_dreambooth_lora.main(argv(**resolved))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    for word in words:
        assert word in err[0], err[0]
    assert not os.path.exists(out)


def test_8bit_adam_without_bitsandbytes(setup, capsys, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    tmp_path, dog, out, argv = setup
    assert train_dreambooth_lora.main(argv(use_8bit_adam=True)) == 2
    err = capsys.readouterr().err.strip()
    assert "--use_8bit_adam needs bitsandbytes" in err and "\n" not in err
    assert not os.path.exists(out)


def test_dataset_without_datasets_package(setup, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_datasets(name, *a, **k):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_datasets)
    tmp_path, dog, out, argv = setup
    assert train_dreambooth_lora.main(argv(instance_data_dir=None, dataset_name="someone/dogs")) == 2
    assert "--dataset_name needs the optional datasets package: pip install datasets" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_warnings_do_not_stop(setup, capsys):
    """Class prompt without prior preservation and fp16 on a CPU-only machine warn and go on."""
    from dreambooth.config import parse_args, validate
    tmp_path, dog, out, argv = setup
    args = parse_args(argv(class_prompt="a photo of dog", mixed_precision="fp16", prior_generation_precision="fp16"))
    messages = []
    run = validate(args, warn=messages.append)
    assert len(run.instance_images) == 2
    assert any("ignored without --with_prior_preservation" in m for m in messages)
    assert any("skipping 1 non-image" in m for m in messages)
    assert any("falling back to fp32" in m for m in messages) and run.training.mixed_precision == "no"
    assert any("generating class images in fp32" in m for m in messages) and run.prior.prior_generation_precision == "fp32"


@pytest.mark.slow
def test_cli_bad_input_is_fast_and_one_line(tmp_path):
    with MachineClock() as clock:
        r = run_script("train_dreambooth_lora.py", "--pretrained_model_name_or_path", "x/y", "--instance_data_dir",
                       tmp_path / "nope", "--instance_prompt", "a", "--output_dir", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip() == f"train_dreambooth_lora.py: error: --instance_data_dir {tmp_path / 'nope'}: folder does not exist"
    assert clock.seconds < clock.budget(20) and not os.path.exists(tmp_path / "out")



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
