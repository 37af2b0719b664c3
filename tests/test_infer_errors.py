"""infer.py fails like the trainer: a problem the user can fix is exactly one line on stderr naming the flag (or
file) and the fix, exit code 2, and nothing written to --output; a bug is run_cli's short bug line and exit code 1,
or the traceback with --debug. Most cases call infer.main in-process: a subprocess costs seconds of imports each.
Flag and path checks come before any model loads; a base or LoRA that cannot load, an unreachable Hub and a failure
mid-run need the tiny model."""
import os
import shutil
import subprocess
import sys

import pytest

import infer
from conftest import HANG_GUARD, ROOT, draw_subject, run_main, train_args

BUG = ("infer.py: internal error: RuntimeError: boom -- this is a bug: rerun the same command with --debug (or "
       "DREAMBOOTH_DEBUG=1) and report it with that traceback (docs/troubleshooting.md, 'Reporting a bug')\n")
COMMON = ["--prompt", "p", "--steps", "1", "--num_images", "1", "--device", "cpu", "--height", "64", "--width", "64"]


@pytest.fixture(autouse=True)
def no_debug_env(monkeypatch):
    monkeypatch.delenv("DREAMBOOTH_DEBUG", raising=False)


@pytest.fixture
def fake_base(tmp_path):
    """Passes every check that needs no model: for failures that must come before a model loads."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "model_index.json").write_text("{}")
    return str(tmp_path / "base")


@pytest.fixture(scope="module")
def files(tiny_model, tmp_path_factory):
    """One trained LoRA for the module, a base of another family, and the broken files users hand over."""
    import torch
    from make_tiny_model import build_tiny_pipeline
    from safetensors.torch import load_file, save_file

    d = tmp_path_factory.mktemp("infer_errors")
    (d / "dog").mkdir()
    for i in range(3):
        draw_subject(d / "dog" / f"dog{i}.png", shift=3 * i)
    r = run_main(*train_args(tiny_model["eps"], d / "dog", d / "lora", "--max_train_steps", "1"))
    assert r.returncode == 0, r.stderr[-3000:]
    # same UNet channels, cross-attention width 64 instead of 32: what SD 2.x (1024) is to SD 1.x (768)
    build_tiny_pipeline(cross_attention_dim=64).save_pretrained(d / "tiny64")
    (d / "kohya_only").mkdir()
    shutil.copy(d / "lora" / "lora.safetensors", d / "kohya_only" / "lora.safetensors")
    (d / "notackpt.ckpt").write_text("not a checkpoint\n")
    (d / "notsafetensors.safetensors").write_text("not a checkpoint\n")
    for name, source in (("truncated.safetensors", tiny_model["single"]),
                         ("truncated_lora.safetensors", d / "lora" / "pytorch_lora_weights.safetensors")):
        data = open(source, "rb").read()
        (d / name).write_bytes(data[:len(data) // 2])
    save_file({"weight": torch.randn(4, 4)}, d / "random.safetensors")
    lora = load_file(d / "lora" / "pytorch_lora_weights.safetensors")
    extra = {"unet.nonexist.to_q.lora_A.weight": torch.zeros(4, 32), "unet.nonexist.to_q.lora_B.weight":
             torch.zeros(32, 4)}
    save_file({**lora, **extra}, d / "mixed.safetensors")  # diffusers only warns about the extra layer
    save_file({"transformer.single_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 32),  # a Flux LoRA's naming
               "transformer.single_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 4)}, d / "flux.safetensors")
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 32),  # SDXL kohya naming
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(32, 4)}, d / "sdxl.safetensors")
    paths = {os.path.splitext(name)[0]: str(d / name) for name in os.listdir(d)}  # {stem} in the cases
    paths.update(tiny=tiny_model["eps"], single=tiny_model["single"],
                 unet=os.path.join(tiny_model["eps"], "unet", "diffusion_pytorch_model.safetensors"))
    return paths


def run(capsys, tmp_path, args):
    code = infer.main([*COMMON, *args, "--output", str(tmp_path / "out")])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("args,line", [
    (["--guidance_scale", "nan"], "argument --guidance_scale: nan is not a finite number"),
    (["--lora_scale", "inf"], "argument --lora_scale: inf is not a finite number"),
    (["--seed", "-1"], "argument --seed: -1 is outside 0..4294967295 (the range numpy and torch both accept)"),
    (["--seed", "4294967296"],
     "argument --seed: 4294967296 is outside 0..4294967295 (the range numpy and torch both accept)"),
    (["--device", "gpu"], "--device gpu: unknown device; use auto, cpu, cuda, cuda:N or mps"),
    (["--base", "{tmp}"], "--base {tmp}: folder has no model_index.json; point it at a diffusers pipeline folder "
                          "(or give a .safetensors/.ckpt file)"),
    (["--base", "{tmp}/notes.txt"], "--base {tmp}/notes.txt: a single-file model must be .safetensors or .ckpt"),
    (["--output", "{tmp}/notes.txt/images"],
     "--output {tmp}/notes.txt/images: cannot create it, {tmp}/notes.txt is not a writable folder"),
], ids=["guidance_nan", "lora_scale_inf", "seed_negative", "seed_too_big", "device_unknown", "base_no_model_index",
        "base_txt", "output_under_file"])
def test_refused_before_loading(tmp_path, capsys, fake_base, args, line):
    (tmp_path / "notes.txt").write_text("x")
    args = [a.format(tmp=tmp_path) for a in ["--base", fake_base, *args]]
    code = infer.main([*COMMON, "--output", str(tmp_path / "out"), *args])
    assert (code, capsys.readouterr().err) == (2, f"infer.py: error: {line.format(tmp=tmp_path)}\n")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("device,cuda,line", [
    ("cuda", 0, "--device cuda: torch sees no CUDA GPU here (torch {torch}); use --device cpu or auto"),
    ("cuda:1", 0, "--device cuda:1: torch sees no CUDA GPU here (torch {torch}); use --device cpu or auto"),
    ("cuda:1", 1, "--device cuda:1: this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
    ("mps", 0, "--device mps: torch sees no Apple MPS device here; use --device cpu or auto"),
], ids=["cuda", "cuda1_no_cuda", "cuda1_of_1", "mps"])
def test_missing_device_refused_before_loading(tmp_path, capsys, monkeypatch, fake_base, device, cuda, line):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(infer, "load_base", lambda *a: pytest.fail("loaded a model for a missing device"))
    code, err = run(capsys, tmp_path, ["--base", fake_base, "--device", device])
    assert (code, err) == (2, f"infer.py: error: {line.format(torch=torch.__version__)}\n")
    assert not os.path.exists(tmp_path / "out")


BASE_CASES = {
    "text_ckpt": ("{notackpt}", "--base {notackpt} is not a torch checkpoint (neither zip nor pickle; a text or "
                                 "HTML file saved under that name?); download or convert it again"),
    "text_safetensors": ("{notsafetensors}", "--base {notsafetensors}: not a readable .safetensors file "
                         "(truncated or corrupt: Error while deserializing header: header too large); "
                         "download or copy it again"),
    "truncated": ("{truncated}", "--base {truncated}: not a readable .safetensors file "
                  "(truncated or corrupt: Error while deserializing header: incomplete metadata, file not fully "
                  "covered); download or copy it again"),
    "random_tensors": ("{random}", "--base {random}: not a Stable Diffusion checkpoint (no "
                       "model.diffusion_model.* weights); give an SD 1.x/2.x, SDXL, SD 3 or Flux.1 checkpoint or a "
                       "diffusers folder"),
    "lora_as_base": ("{lora}/lora.safetensors", "--base {lora}/lora.safetensors is a LoRA; pass it as --lora, with "
                     "the model it was trained on as --base"),
}
LORA_CASES = {
    "random_tensors": ("{random}", "--lora {random}: not a LoRA file (no lora_A/lora_down/... "
                       "keys)"),
    "full_unet": ("{unet}", "--lora {unet}: not a LoRA file (no lora_A/lora_down/... keys)"),
    "truncated": ("{truncated_lora}", "--lora {truncated_lora}: not a readable .safetensors "
                  "file (truncated or corrupt: Error while deserializing header: incomplete metadata, file not fully "
                  "covered); download or copy it again"),
    "other_width": ("{lora}", "--lora {lora} was trained for a base with cross-attention width 32; --base {tiny64} "
                    "has 64; give --base the model it was trained on"),
    "other_width_kohya": ("{lora}/lora.safetensors", "--lora {lora}/lora.safetensors was trained for a base with "
                          "cross-attention width 32; --base {tiny64} has 64; give --base the model it was trained on"),
    "extra_layer": ("{mixed}", "--lora {mixed}: 2 of its weights fit no layer of --base "
                    "{tiny} (e.g. nonexist.to_q.lora_A.weight); it was made for another kind of model"),
    "no_layer": ("{flux}", "--lora {flux}: none of its layers exists in --base {tiny}, so it "
                 "would change nothing; it was made for another kind of model"),
    "other_layout": ("{sdxl}", "--lora {sdxl} does not fit --base {tiny} (Target modules "
                     "{{'down_blocks.4.1.proj_in'}} not found in the base model. Please check the target modules and "
                     "try again.); give --base the model it was trained on"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", [f"base-{k}" for k in BASE_CASES] + [f"lora-{k}" for k in LORA_CASES])
def test_unloadable_base_or_lora(files, tmp_path, capsys, case):
    kind, name = case.split("-", 1)
    value, line = (BASE_CASES if kind == "base" else LORA_CASES)[name]
    base = files["tiny64"] if "other_width" in name else files["tiny"]
    args = ["--base", value.format(**files)] if kind == "base" else ["--base", base, "--lora", value.format(**files)]
    code, err = run(capsys, tmp_path, args)
    assert (code, err) == (2, f"infer.py: error: {line.format(**files)}\n")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("base,env,line", [
    ("someorg/somemodel", {}, "--base someorg/somemodel: not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 "
                              "forbids downloading it; unset HF_HUB_OFFLINE or give a folder"),
    ("someorg/somemodel", {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},
     "--base someorg/somemodel: the network could not reach the Hugging Face Hub to download it ([Errno 111] "
     "Connection refused); check the connection, or give a local folder"),
    ("{single}", {}, "--base {single}: loading a single file needs its pipeline config from the Hugging Face Hub, "
                     "and HF_HUB_OFFLINE=1 forbids downloading it; run once online to cache it, or give a diffusers "
                     "folder"),
], ids=["hub_offline", "hub_unreachable", "single_file_offline"])
def test_hub_unreachable(tiny_model, tmp_path, base, env, line):
    """Subprocesses: the hub's offline switch is read once, at import. HF_ENDPOINT at a closed local port is a
    network that cannot reach the Hub, without waiting for a timeout."""
    cmd = [sys.executable, "infer.py", "--base", base.format(**tiny_model), *COMMON, "--output", tmp_path / "out"]
    r = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=HANG_GUARD, cwd=ROOT,
                       env={**os.environ, "HF_HUB_OFFLINE": "1", "DREAMBOOTH_DEBUG": "", **env})
    assert (r.returncode, r.stderr) == (2, f"infer.py: error: {line.format(**tiny_model)}\n")
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_kohya_only_folder_loads_and_fp16_on_cpu_warns(files, tmp_path, capsys):
    code, err = run(capsys, tmp_path, ["--base", files["tiny"], "--lora", files["kohya_only"], "--dtype", "fp16"])
    assert (code, err) == (0, "infer.py: warning: --dtype fp16 on cpu is slow or unsupported; using fp32\n"
                              f"infer.py: note: --lora {files['kohya_only']} was trained with the trigger words "
                              '"a photo of sks dog", which --prompt "p" does not contain; add them to get the trained '
                              "subject\n")  # the kohya file's header names them
    assert sorted(os.listdir(tmp_path / "out")) == ["00-00-p.png", "grid.png"]


@pytest.mark.slow
def test_failure_mid_run_writes_nothing(tiny_model, tmp_path, capsys, monkeypatch):
    """The second prompt fails after the first one's image exists in memory: no file of it reaches --output."""
    from diffusers import StableDiffusionPipeline
    calls, real_call = [], StableDiffusionPipeline.__call__

    def call(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real_call(self, *args, **kwargs)
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", call)
    code, err = run(capsys, tmp_path, ["--base", tiny_model["eps"], "--prompt", "q"])
    assert (code, err, len(calls)) == (1, BUG, 2)
    assert not os.path.exists(tmp_path / "out")


def test_bug_is_one_line_and_debug_shows_it(tmp_path, capsys, monkeypatch, fake_base):
    def boom(*args):
        raise RuntimeError("boom")
    monkeypatch.setattr(infer, "load_base", boom)
    assert run(capsys, tmp_path, ["--base", fake_base]) == (1, BUG)
    with pytest.raises(RuntimeError, match="boom"):
        run(capsys, tmp_path, ["--base", fake_base, "--debug"])
    monkeypatch.setenv("DREAMBOOTH_DEBUG", "1")
    with pytest.raises(infer.UsageError, match="nan is not a finite number"):  # user errors too: whole traceback
        run(capsys, tmp_path, ["--base", fake_base, "--guidance_scale", "nan"])
    assert not os.path.exists(tmp_path / "out")


def test_help_shows_the_example_and_each_default_once(capsys):
    with pytest.raises(SystemExit) as e:
        infer.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "example:\n  python infer.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 \\\n      --lora" in out
    assert "(default: None)" not in out and "(default: [])" not in out and "(default: False)" not in out
    for default in ("4", "the family's: 30", "the family's: 7.5", "0", "dpm++", "auto", "outputs", "1.0 each", "none",
                    "the model's size"):
        assert f"(default: {default}" in " ".join(out.split())
    assert all(out.count(f"(default: {d})") == 1 for d in ("4", "0", "outputs"))


@pytest.mark.parametrize("args,message", [
    (["--lora", "/nonexistent/lora"], "--lora /nonexistent/lora: no such file or folder"),
    (["--lora", "{empty}"], "folder has no .safetensors file"),
    (["--lora", "{empty}", "--lora_scale", "1", "--lora_scale", "2"], "--lora_scale given 2 times for 1 --lora"),
    (["--height", "100"], "--height must be a multiple of 8"),
    (["--num_images", "0"], "--num_images and --steps must be >= 1"),
    (["--base", "./models/nope"], "--base ./models/nope: no such file or folder"),
])
def test_infer_bad_input(tmp_path, capsys, args, message):
    import infer
    (tmp_path / "empty").mkdir()
    argv = ["--base", "x/y", "--prompt", "p", "--output", str(tmp_path / "o")]
    argv += [a.format(empty=tmp_path / "empty") for a in args]
    assert infer.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not os.path.exists(tmp_path / "o")
