"""Tiny SD models of the real architectures, built once per test session (no downloads)."""
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "examples"))


pytest_plugins = ("fake_hub",)  # the fake Hub fixture, for push-to-hub tests


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end runs of the real scripts (subprocesses)")


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """A training run in this process installs its SIGINT/SIGTERM handlers (finish the step, checkpoint); tests that
    call main() directly would leave them to the rest of the session, which then ignores Ctrl-C and `kill`."""
    import signal
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGINT, handlers[0])
    signal.signal(signal.SIGTERM, handlers[1])


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


# No test waits a fixed number of seconds for something to happen: it waits for the event (a line printed, a file
# written, the process's exit), however long a loaded machine takes. HANG_GUARD only ends a child that hangs, so a
# hang fails the suite instead of stalling it; it is far beyond what any of these runs takes on a busy 2-core machine.
HANG_GUARD = 3600


def run_script(script, *args, env=None, timeout=HANG_GUARD, launcher=None):
    cmd = (launcher or [sys.executable]) + [os.path.join(ROOT, script)] + [str(a) for a in args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)


def run_main(*args):
    """The trainer's main() in this process, returned as run_script returns it (returncode, stdout, stderr): the
    same run without a new interpreter's ~7 s of imports (measured: torch, diffusers, transformers, peft). For
    runs whose launch is not what the test is about; accelerate's per-process state and the signal handlers
    main() installs are put back afterwards."""
    import contextlib
    import io
    import signal

    import train_dreambooth_lora
    from accelerate.state import AcceleratorState
    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    offline = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = train_dreambooth_lora.main(argv)
    finally:
        if offline is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = offline
        signal.signal(signal.SIGINT, handlers[0])
        signal.signal(signal.SIGTERM, handlers[1])
        AcceleratorState._reset_state(reset_partial_state=True)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def read_until(proc, done, stream=None):
    """Read proc's stderr (or `stream`) until done(text read so far) is true or the stream ends (the process and
    every child holding the pipe exited); returns the text. Waits on the event, not a clock: the process is killed
    only after HANG_GUARD seconds, so a hang fails here instead of stalling the suite."""
    stream = stream or proc.stderr
    guard = threading.Timer(HANG_GUARD, proc.kill)
    guard.start()
    seen = ""
    try:
        while not done(seen):
            chunk = stream.read(1)
            if not chunk:
                break
            seen += chunk
    finally:
        guard.cancel()
    return seen


class MachineClock:
    """Wall time of a block, and time budgets scaled by how slow this machine is for us during it: a thread samples
    (20 ms of counting each half second) how much longer than its CPU time a piece of work takes here, 1 on an idle
    machine, more under load or a lower priority. A test asserting that something is fast (fails before any model
    loads, without network retries) compares against clock.budget(seconds), which is `seconds` on an idle machine."""

    def __enter__(self):
        self.samples, self._stop = [], threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def _sample(self):
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            while time.thread_time() - cpu < 0.02:
                pass
            self.samples.append((time.perf_counter() - wall) / max(time.thread_time() - cpu, 1e-6))
            if self._stop.wait(0.5):
                return

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started
        self._stop.set()
        self._thread.join()

    @property
    def slowness(self):
        return max(1.0, sum(self.samples) / len(self.samples))

    def budget(self, seconds):
        return seconds * self.slowness


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


def snapshot(folder):
    """Every file under folder with its size and mtime: 'nothing written' means this does not change."""
    if not os.path.exists(folder):
        return None
    return sorted((os.path.relpath(os.path.join(d, f), folder), os.stat(os.path.join(d, f)).st_size,
                   os.stat(os.path.join(d, f)).st_mtime_ns) for d, _, files in os.walk(folder) for f in files)


def make_checkpoint(folder, step, settings=None, lora_bytes=None):
    """A checkpoint folder with the files accelerate's save_state writes for our run (torch zip archives,
    pickles, the LoRA safetensors) and the LoRA settings it was made with."""
    import torch
    from safetensors.torch import save_file
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
    """(tmp_path, photos folder, output folder, argv(*flags, **overrides)): a command line for main() with the tiny
    SD model and two photos, for checks that end before training (test_output_safety wraps it: report_to none,
    offline)."""
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
    """main(world's argv) exits 2 with exactly `line` (after the program prefix) and changes nothing in --output_dir."""
    import train_dreambooth_lora
    tmp_path, dog, out, argv = world
    before = snapshot(out)
    code = train_dreambooth_lora.main(argv(*extra, **overrides))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err == ["train_dreambooth_lora.py: error: " + line]
    assert snapshot(out) == before


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
