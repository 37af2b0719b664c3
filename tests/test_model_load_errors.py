"""Failures that can only be known once the model is read: weights that are corrupt or missing, a Hub id that is
not cached offline or cannot be reached, a single file that is no model, LoRA target modules the model does not
have or peft cannot wrap, a resolution the model's VAE and UNet cannot take. Each is one line and exit code 2,
with nothing written. The flag checks that come before any load are in test_flag_checks.py."""
import os
import shutil

import pytest

from conftest import MachineClock, run_script, train_args

pytestmark = pytest.mark.slow
P = "train_dreambooth_lora.py: error: "


def one_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


def test_corrupt_model_weights(tiny_model, instance_dir, tmp_path, in_process, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_model["eps"], model)
    weights = model / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    out = tmp_path / "out"
    assert in_process(train_args(str(model), instance_dir, str(out))) == 2
    line = one_line(capsys)
    assert line.startswith(P + f"--pretrained_model_name_or_path {model}: cannot load its unet (OSError: ")
    assert line.endswith("); its files are missing or corrupt: download or convert the model again")
    assert not out.exists()
    weights.unlink()
    assert in_process(train_args(str(model), instance_dir, str(out))) == 2
    assert one_line(capsys) == P + (f"--pretrained_model_name_or_path {model}: cannot load its unet (OSError: Error no "
                                    f"file named diffusion_pytorch_model.bin found in directory {model}.); its files "
                                    "are missing or corrupt: download or convert the model again")


def test_hub_id_offline_and_single_file_that_is_no_model(tiny_model, instance_dir, tmp_path, in_process, capsys):
    out = tmp_path / "out"
    assert in_process(train_args("someone/not-cached", instance_dir, str(out))) == 2
    assert one_line(capsys) == P + ("--pretrained_model_name_or_path someone/not-cached: cannot load its "
                                    "model_index.json: it is not in the local cache and HF_HUB_OFFLINE=1 is set; "
                                    "unset HF_HUB_OFFLINE, or download it first (hf download someone/not-cached)")
    import torch
    from safetensors.torch import save_file
    save_file({"some.weight": torch.zeros(3)}, str(tmp_path / "lora.safetensors"))
    assert in_process(train_args(str(tmp_path / "lora.safetensors"), instance_dir, str(out),
                                 "--single_file_config", tiny_model["eps"])) == 2
    line = one_line(capsys)
    assert line.startswith(P + f"--pretrained_model_name_or_path {tmp_path}/lora.safetensors: cannot load its "
                               "single-file checkpoint (")
    assert line.endswith("); its files are missing or corrupt: download or convert the model again")
    assert not out.exists()


def test_lora_target_peft_cannot_wrap(tiny_model, instance_dir, tmp_path, in_process, capsys):
    out = tmp_path / "out"
    assert in_process(train_args(tiny_model["eps"], instance_dir, str(out), "--lora_target_modules", "to_q,attn1")) == 2
    assert one_line(capsys) == P + ("--lora_target_modules: attn1 is of type Attention, and LoRA wraps only Linear, "
                                    "Conv and Embedding layers; name the layers inside it instead: attn1.to_k, "
                                    "attn1.to_q, attn1.to_v")
    assert not out.exists()



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



def test_resolution_follows_the_model(tiny_model, instance_dir, tmp_path, in_process, capsys):
    """An SD-like model (8x VAE, 2-level UNet) takes multiples of 16 only; the 4x test model trains at 32 px."""
    from make_tiny_model import build_tiny_pipeline
    sd_like = tmp_path / "sd-like"
    build_tiny_pipeline(vae_channels=(32, 32, 64, 64)).save_pretrained(sd_like)
    out = tmp_path / "out"
    assert in_process(train_args(str(sd_like), instance_dir, str(out), "--resolution", "40")) == 2
    assert one_line(capsys) == P + ("--resolution 40 is not a multiple of 16, the smallest size step this model "
                                    "takes; use 32 or 48")
    assert not out.exists()
    assert in_process(train_args(tiny_model["eps"], instance_dir, str(out), "--resolution", "32",
                                 "--max_train_steps", "1", "--report_to", "none")) == 0
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors")


def test_unreachable_hub_is_one_line_in_seconds(instance_dir, tmp_path):
    """No network: one line naming the endpoint and the fix, not half a minute of retries and their log lines."""
    with MachineClock() as clock:
        r = run_script("train_dreambooth_lora.py", *train_args("someone/sd-model", instance_dir, tmp_path / "out"),
                       env={"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"})
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [P + (
        "--pretrained_model_name_or_path someone/sd-model: cannot reach the Hugging Face Hub to download it "
        "(http://127.0.0.1:9: Connection refused); check the network, or point the flag at a local folder")]
    assert clock.seconds < clock.budget(25) and not (tmp_path / "out").exists()
