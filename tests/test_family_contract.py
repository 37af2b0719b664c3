"""Every model family through the same checks, on its tiny model: detected from its files; trains with and without
prior preservation (class images sampled by its pipeline); the diffusers file loads in its pipeline and changes
the image, and unloading restores it; ComfyUI's loader consumes every key of the UI file and patches exactly the
weights diffusers' fuse_lora computes; resume is bit-exact; infer.py and evaluate.py run on the output.

Adding a family = its module in dreambooth/families/, its tiny builder in examples/make_tiny_model.py, one row here.
"""
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import evaluate
import infer
import train_dreambooth_lora
from comfy_keys import delta, key_map, load_lora
from conftest import train_args

# (tiny_model key, family class name, flags this family's runs add)
ROWS = {
    "sd15": ("eps", "StableDiffusion", ()),
    "sd2-v": ("v", "StableDiffusion", ()),
    "sdxl": ("xl", "StableDiffusionXL", ()),
    "sd3": ("sd3", "StableDiffusion3", ()),
    "sd3-no-t5": ("sd3_no_t5", "StableDiffusion3", ("--max_sequence_length", "16")),
    "flux-dev": ("flux", "Flux", ("--max_sequence_length", "32")),
    "flux-schnell": ("flux_schnell", "Flux", ()),
}
PROMPT = "a photo of sks dog"


def _families():
    from dreambooth import families
    return families


def _pipeline(family, model):
    pipe = family.pipeline_class().from_pretrained(model, **family.single_file_extras,
                                                   **family.from_pretrained_extras(model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe):
    return pipe(PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=64, width=64,
                output_type="np").images[0]


def train(*args):
    return train_dreambooth_lora.main([str(a) for a in train_args(*args)])


def _module(model, path):
    """A module by its diffusers path; transformers 5's CLIPTextModel has no text_model level."""
    try:
        return model.get_submodule(path)
    except AttributeError:
        return model.get_submodule(path.removeprefix("text_model."))


@pytest.mark.slow
@pytest.mark.parametrize("row", sorted(ROWS))
def test_family_contract(row, tiny_model, instance_dir, tmp_path, tiny_judges):
    key, class_name, extra = ROWS[row]
    model, families = tiny_model[key], _families()
    family = families.detect(families.ModelSource(model))
    assert family.__name__ == class_name

    # trains with prior preservation: class images come from the family's pipeline
    common = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "none", *extra]
    prior = ["--with_prior_preservation", "--class_prompt", "a photo of dog", "--num_class_images", "2",
             "--class_generation_steps", "2", "--sample_batch_size", "2"]
    out = tmp_path / "run"
    assert train(model, instance_dir, out, *common, *prior) == 0
    assert len([n for n in os.listdir(out / "class_images") if n.endswith(".png")]) == 2
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(k.startswith(family.denoiser_name + ".") and "lora" in k for k in lora)

    # resume is bit-exact: one step, then the same command resumed to two, equals the straight run
    resumed = tmp_path / "resumed"
    shutil.copytree(out / "class_images", resumed / "class_images")
    assert train(model, instance_dir, resumed, *common, *prior, "--max_train_steps", "1") == 0
    assert train(model, instance_dir, resumed, *common, *prior, "--resume_from_checkpoint", "latest") == 0
    again = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert again.keys() == lora.keys() and all(torch.equal(again[k], lora[k]) for k in lora)

    # without prior preservation, text-encoder LoRA too, a validation grid, and alpha != rank: diffusers (from the
    # file's adapter metadata) and ComfyUI (from the .alpha keys) must both apply alpha / rank = 2
    te = tmp_path / "te"
    assert train(model, instance_dir, te, *common, "--train_text_encoder", "--validation_prompt", PROMPT,
                 "--num_validation_images", "1", "--rank", "4", "--lora_alpha", "8") == 0
    assert os.path.isfile(te / "validation" / "step-000002.png")
    te_lora = load_file(te / "pytorch_lora_weights.safetensors")
    trained_encoders = {k.split(".")[0] for k in te_lora} - {family.denoiser_name}
    assert trained_encoders == {n for n, t in zip(family.text_encoder_names, family.text_encoder_lora_targets) if t}

    # the diffusers file loads in the family's pipeline and changes the image; unloading restores it
    pipe = _pipeline(family, model)
    before = _image(pipe)
    pipe.load_lora_weights(str(te))
    assert not (_image(pipe) == before).all()
    pipe.unload_lora_weights()
    assert (_image(pipe) == before).all()

    # ComfyUI loads every key of the UI file and patches what diffusers' fuse_lora computes
    ui = load_file(te / "te.safetensors")
    loaded = family.from_pipeline(pipe)
    patches, left = load_lora(ui, key_map(loaded))
    assert left == [] and patches
    assert {scale for _, _, scale in patches.values()} == {2.0}
    parts = {"denoiser": loaded.denoiser, **{f"text_encoder:{i}": e for i, e in enumerate(loaded.text_encoders)}}
    base = {t: _module(parts[t[0]], t[1]).weight.detach().clone() for t in patches}
    pipe.load_lora_weights(str(te))
    pipe.fuse_lora(components=[family.denoiser_name, *sorted(trained_encoders)])
    for target, patch in patches.items():
        fused = _module(parts[target[0]], target[1]).get_base_layer().weight \
            if hasattr(_module(parts[target[0]], target[1]), "get_base_layer") else _module(parts[target[0]], target[1]).weight
        torch.testing.assert_close((fused.detach() - base[target]).flatten(1).float(), delta(patch), atol=1e-5, rtol=1e-4)

    # infer.py (both files) and evaluate.py take the output
    for i, lora_path in enumerate((out, te / "te.safetensors")):
        assert infer.main(["--base", model, "--lora", str(lora_path), "--prompt", PROMPT, "--num_images", "1",
                           "--steps", "2", "--height", "64", "--width", "64",
                           "--output", str(tmp_path / f"infer{i}")]) == 0
        assert os.path.isfile(tmp_path / f"infer{i}" / "grid.png")
    assert evaluate.main(["--base", model, "--lora", str(out), "--real_dir", instance_dir, "--class_name", "dog",
                          "--num_images", "1", "--num_prompts", "1", "--num_class_images", "1", "--steps", "2",
                          "--resolution", "64", "--dino_model", tiny_judges["dino"], "--clip_model",
                          tiny_judges["clip"], "--output", str(tmp_path / "eval"), "--no_progress"]) == 0
    assert os.path.isfile(tmp_path / "eval" / "metrics.json")


@pytest.mark.slow
@pytest.mark.parametrize("row", ["sd3", "flux-dev"])
def test_validation_reuses_the_prompt_encoded_up_front(row, tiny_model, instance_dir, tmp_path, monkeypatch):
    """With frozen text encoders the validation prompt is encoded once at set-up: the text encoders never come
    back to the device for validation, and the grid is the one encoding it at validation time gives. The final
    grid is skipped with --skip_final_inference."""
    from diffusers.training_utils import offload_models
    key, _, extra = ROWS[row]
    returned = []

    def spy(*modules, **kwargs):
        returned.append([type(m).__name__ for m in modules])
        return offload_models(*modules, **kwargs)
    monkeypatch.setattr("diffusers.training_utils.offload_models", spy)
    flags = ["--max_train_steps", "2", "--validation_prompt", PROMPT, "--num_validation_images", "2",
             "--validation_steps", "1", "--report_to", "none", *extra]
    assert train(tiny_model[key], instance_dir, tmp_path / "cached", *flags, "--skip_final_inference") == 0
    assert returned == [["AutoencoderKL"], ["AutoencoderKL"]]  # steps 1 and 2; no final grid
    returned.clear()
    assert train(tiny_model[key], instance_dir, tmp_path / "live", *flags, "--no-pre_compute_text_embeddings") == 0
    assert len(returned) == 3 and all(len(r) > 1 for r in returned)  # the text encoders come back each time
    for step in ("000001", "000002"):
        cached = (tmp_path / "cached" / "validation" / f"step-{step}.png").read_bytes()
        assert cached == (tmp_path / "live" / "validation" / f"step-{step}.png").read_bytes()
