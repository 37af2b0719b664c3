"""infer.py on a trained tiny LoRA: images and grid written, LoRA strength applied, LoRAs stacked (folder, file or
checkpoint). Its errors are in test_infer_errors.py."""
import os

import numpy as np
import pytest
from PIL import Image

from conftest import train_args


def grid(folder):
    return np.asarray(Image.open(os.path.join(folder, "grid.png")), dtype=np.float64)


@pytest.mark.slow
def test_infer_scales_and_stacks_loras(tiny_model, instance_dir, tmp_path, in_process, capsys):
    """The training run and the five infer.py runs in this process: each subprocess paid seconds of imports."""
    import infer
    out = tmp_path / "lora"
    code = in_process(train_args(tiny_model["eps"], instance_dir, str(out), "--max_train_steps", "3", "--learning_rate",
                                 "5e-2", "--output_format", "diffusers", "--checkpointing_steps", "3"))
    assert code == 0, capsys.readouterr().err[-3000:]
    common = ["--base", tiny_model["eps"], "--prompt", "a photo of sks dog", "--num_images", "2", "--steps", "3",
              "--seed", "5", "--scheduler", "euler", "--device", "cpu", "--dtype", "fp32"]
    runs = {"base": [], "zero": ["--lora", out, "--lora_scale", "0"], "full": ["--lora", out],
            "file": ["--lora", out / "pytorch_lora_weights.safetensors", "--lora_scale", "1"],
            "two": ["--lora", out, "--lora", out / "checkpoint-3", "--lora_scale", "0.5", "--lora_scale", "0.5"]}
    for name, extra in runs.items():
        capsys.readouterr()
        code = infer.main([str(a) for a in (*common, *extra, "--negative_prompt", "blurry", "--output", tmp_path / name)])
        r = capsys.readouterr()
        assert code == 0, r.err[-3000:]
        assert "wrote 2 images and grid.png" in r.out
        pngs = sorted(os.listdir(tmp_path / name))
        assert pngs == ["00-00-a_photo_of_sks_dog.png", "00-01-a_photo_of_sks_dog.png", "grid.png"]
    assert np.abs(grid(tmp_path / "zero") - grid(tmp_path / "base")).max() <= 1  # scale 0 is the base model
    assert np.abs(grid(tmp_path / "full") - grid(tmp_path / "base")).mean() > 0.5  # the LoRA shows
    assert np.abs(grid(tmp_path / "file") - grid(tmp_path / "full")).max() <= 1  # folder or file: same weights
    # checkpoint-3 is the final LoRA here, so 0.5 + 0.5 of the same weights is the full LoRA again
    assert np.abs(grid(tmp_path / "two") - grid(tmp_path / "full")).max() <= 2
