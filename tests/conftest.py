"""Tiny SD models of the real architectures, built once per test session (no downloads)."""
import os
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))


pytest_plugins = ("fake_hub",)  # the fake Hub fixture, for push-to-hub tests


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the real scripts (subprocesses)")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from make_tiny_model import main
    out = tmp_path_factory.mktemp("models")
    main(["--out", str(out / "tiny-sd"), "--single_file", str(out / "tiny-sd.safetensors")])
    main(["--out", str(out / "tiny-sd-v"), "--prediction_type", "v_prediction", "--seed", "1"])
    main(["--family", "sdxl", "--out", str(out / "tiny-sdxl"), "--single_file", str(out / "tiny-sdxl.safetensors")])
    main(["--family", "sd3", "--out", str(out / "tiny-sd3")])
    main(["--family", "sd3", "--no_t5", "--out", str(out / "tiny-sd3-no-t5")])
    main(["--family", "flux", "--out", str(out / "tiny-flux")])
    main(["--family", "flux", "--schnell", "--out", str(out / "tiny-flux-schnell")])
    return {"eps": str(out / "tiny-sd"), "single": str(out / "tiny-sd.safetensors"), "v": str(out / "tiny-sd-v"),
            "xl": str(out / "tiny-sdxl"), "xl_single": str(out / "tiny-sdxl.safetensors"), "sd3": str(out / "tiny-sd3"),
            "sd3_no_t5": str(out / "tiny-sd3-no-t5"), "flux": str(out / "tiny-flux"),
            "flux_schnell": str(out / "tiny-flux-schnell")}


@pytest.fixture(scope="session")
def tiny_judges(tmp_path_factory):
    """A tiny ViTModel (the DINO stand-in) and CLIPModel + tokenizer saved as folders, as a hub download would be."""
    import torch
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    from make_tiny_model import _tiny_tokenizer

    out = tmp_path_factory.mktemp("judges")
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=32, patch_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64), add_pooling_layer=False).save_pretrained(out / "dino")
    tokenizer, vocab = _tiny_tokenizer()
    clip = CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                         eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"]),
        vision_config=dict(image_size=32, patch_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2),
        projection_dim=16))
    clip.save_pretrained(out / "clip")
    tokenizer.save_pretrained(out / "clip")
    return {"dino": str(out / "dino"), "clip": str(out / "clip")}


def draw_subject(path, size=(80, 64), shift=0, mode="RGB"):
    """A brown blob on a beige background: enough structure for a loss to go down."""
    im = Image.new("RGB", size, (220, 200, 170))
    d = ImageDraw.Draw(im)
    d.ellipse((10 + shift, 10, size[0] - 15 + shift, size[1] - 8), fill=(110, 70, 35))
    d.ellipse((20 + shift, 20, 30 + shift, 30), fill=(10, 10, 10))
    im.convert(mode).save(path)
    return path


@pytest.fixture
def instance_dir(tmp_path):
    folder = tmp_path / "dog"
    folder.mkdir()
    for i in range(3):
        draw_subject(folder / f"dog{i}.png", shift=i * 3)
    return str(folder)


def run_script(script, *args, env=None, timeout=300, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, script)] + [str(a) for a in args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def train_args(model, instance_dir, output_dir, *extra):
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", instance_dir,
            "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--train_batch_size", "1",
            "--learning_rate", "1e-3", "--seed", "0", "--output_dir", output_dir, *extra]


@pytest.fixture(scope="module")
def imgs(tmp_path_factory):
    """Stands in for diffusers' docs/source/en/imgs (their DreamBooth tests' photos): images of different sizes."""
    folder = tmp_path_factory.mktemp("imgs")
    for i, size in enumerate([(80, 64), (64, 96), (128, 128)]):
        draw_subject(folder / f"img{i}.png", size=size, shift=i)
    return str(folder)


@pytest.fixture
def fails(tiny_model, instance_dir, tmp_path, capsys):
    """fails(model, *flags): trains a tiny model (a tiny_model key, or a path) with extra flags; returns its one
    error line without the program prefix, the model's path written MODEL, after checking the exit code 2 and that
    nothing was written."""
    import train_dreambooth_lora

    def run(model, *extra):
        out = tmp_path / "out"
        path = tiny_model.get(model, model)
        code = train_dreambooth_lora.main(["--pretrained_model_name_or_path", path, "--instance_data_dir",
                                           instance_dir, "--instance_prompt", "a photo of sks dog", "--output_dir",
                                           str(out), "--resolution", "64", *extra])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and not out.exists(), err
        return err[0].removeprefix("train_dreambooth_lora.py: error: ").replace(path, "MODEL")
    return run


def flag_argv(base, *extra, **overrides):
    """{flag: value} (True: a bare switch; None: left out), overridden per call, then extra words: a command line."""
    args = []
    for k, v in {**base, **overrides}.items():
        if v is not None:
            args += [f"--{k}"] if v is True else [f"--{k}", str(v)]
    return args + [str(e) for e in extra]


@pytest.fixture
def in_process(monkeypatch):
    """main() in this process: faster than a subprocess for runs that stop right after loading. accelerate keeps
    its state per process and main() installs signal handlers, so both are put back afterwards."""
    import signal

    import train_dreambooth_lora
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield train_dreambooth_lora.main
    signal.signal(signal.SIGINT, handlers[0])
    signal.signal(signal.SIGTERM, handlers[1])
    from accelerate.state import AcceleratorState
    AcceleratorState._reset_state(reset_partial_state=True)
