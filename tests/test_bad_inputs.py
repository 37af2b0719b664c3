"""Every bad input fails before any model loads: exit 2, one line naming the flag, no output folder."""
import os

import pytest

import train_dreambooth_lora
from conftest import draw_subject, run_script, train_args


@pytest.fixture
def setup(tmp_path, tiny_model):
    dog = tmp_path / "dog"
    dog.mkdir()
    for i in range(2):
        draw_subject(dog / f"dog{i}.png", shift=i)
    (dog / "notes.md").write_text("not an image")
    out = tmp_path / "out"

    def argv(**overrides):
        base = {"pretrained_model_name_or_path": tiny_model["eps"], "instance_data_dir": str(dog),
                "instance_prompt": "a photo of sks dog", "output_dir": str(out), "resolution": "64"}
        base.update(overrides)
        args = []
        for k, v in base.items():
            if v is None:
                continue
            args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
        return args
    return tmp_path, dog, out, argv


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
def test_bad_lora_target_after_model_load_writes_nothing(tiny_model, instance_dir, tmp_path):
    out = tmp_path / "out"
    r = run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, out,
                                                            "--lora_target_modules", "to_q,attn_qkv",
                                                            "--with_prior_preservation", "--class_prompt", "dog"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1] == ("train_dreambooth_lora.py: error: --lora_target_modules: no "
                                                 "UNet2DConditionModel module named attn_qkv; the default for this "
                                                 "model is to_q,to_k,to_v,to_out.0")
    assert not os.path.exists(out)


@pytest.mark.slow
def test_cli_bad_input_is_fast_and_one_line(tmp_path):
    import time
    start = time.perf_counter()
    r = run_script("train_dreambooth_lora.py", "--pretrained_model_name_or_path", "x/y", "--instance_data_dir",
                   tmp_path / "nope", "--instance_prompt", "a", "--output_dir", tmp_path / "out")
    assert r.returncode == 2
    assert r.stderr.strip() == f"train_dreambooth_lora.py: error: --instance_data_dir {tmp_path / 'nope'}: folder does not exist"
    assert time.perf_counter() - start < 20 and not os.path.exists(tmp_path / "out")
