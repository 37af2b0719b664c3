"""SDXL through the model-family seam, on a tiny SDXL pipeline of the real classes (two CLIP encoders, the
`text_time` added conditioning): conditioning units, then end-to-end runs of the trainer and infer.py."""
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_script, train_args


def xl_args(tiny_model, instance_dir, out, *extra):
    return train_args(tiny_model["xl"], instance_dir, out, "--report_to", "none", *extra)


def family_of(path):
    from dreambooth.families import StableDiffusionXL
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    return pipe, StableDiffusionXL.from_pipeline(pipe)


def test_detection_from_folder_single_file_and_parts(tiny_model, tmp_path):
    from dreambooth.families import ModelSource, StableDiffusion, StableDiffusionXL, detect
    assert detect(ModelSource(tiny_model["xl"])) is StableDiffusionXL
    assert detect(ModelSource(tiny_model["xl_single"])) is StableDiffusionXL
    assert detect(ModelSource(tiny_model["eps"])) is StableDiffusion
    assert detect(ModelSource(tiny_model["single"])) is StableDiffusion
    parts = tmp_path / "parts"  # a folder with unet/ but no model_index.json: the UNet's config decides
    (parts / "unet").mkdir(parents=True)
    (parts / "unet" / "config.json").write_text(open(os.path.join(tiny_model["xl"], "unet", "config.json")).read())
    assert detect(ModelSource(str(parts))) is StableDiffusionXL


def test_sdxl_encoding_matches_the_pipeline_and_time_ids_come_from_the_batch(tiny_model):
    from dreambooth.families import PromptEncoder
    pipe, family = family_of(tiny_model["xl"])
    prompts = PromptEncoder(family, ["a photo of sks dog", "a photo of dog"])
    batch = {"prompt_ids": torch.tensor([0, 1]), "original_sizes": torch.tensor([[80, 64], [64, 64]]),
             "crop_top_lefts": torch.tensor([[0, 8], [0, 0]]), "target_sizes": torch.tensor([[64, 64], [64, 64]])}
    with torch.no_grad():
        kwargs = prompts.conditioning(batch)
        embeds, _, pooled, _ = pipe.encode_prompt(["a photo of sks dog", "a photo of dog"], device="cpu",
                                                  do_classifier_free_guidance=False)
    torch.testing.assert_close(kwargs["encoder_hidden_states"], embeds)
    torch.testing.assert_close(kwargs["added_cond_kwargs"]["text_embeds"], pooled)
    assert kwargs["added_cond_kwargs"]["time_ids"].tolist() == [[80, 64, 0, 8, 64, 64], [64, 64, 0, 0, 64, 64]]
    # the pipeline builds the same time ids for a 64x64 image sampled with crop (0, 0)
    ids = pipe._get_add_time_ids((64, 64), (0, 0), (64, 64), dtype=torch.float32,
                                 text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    assert ids.tolist()[0] == kwargs["added_cond_kwargs"]["time_ids"].tolist()[1]
    family.fixed_crop_top_left = (3, 5)  # --crops_coords_top_left_h/_w: one corner for all
    assert prompts.conditioning(batch)["added_cond_kwargs"]["time_ids"][:, 2:4].tolist() == [[3, 5], [3, 5]]
    # precomputed embeddings carry the pooled ones too
    prompts.precompute(torch.float32)
    assert set(prompts.encoded) == {"encoder_hidden_states", "text_embeds"}
    torch.testing.assert_close(prompts.conditioning(batch)["added_cond_kwargs"]["text_embeds"], pooled)


def test_kohya_sdxl_names(tiny_model):
    from peft import LoraConfig
    from dreambooth.lora_io import kohya_state_dict
    pipe, family = family_of(tiny_model["xl"])
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q", "conv1", "conv"]))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=2, target_modules=["q_proj"]))
    keys = set(kohya_state_dict(family, pipe.unet, [pipe.text_encoder, pipe.text_encoder_2]))
    assert "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_q.lora_up.weight" in keys
    assert "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight" in keys  # resnet conv1
    assert "lora_unet_input_blocks_3_0_op.lora_down.weight" in keys  # downsampler conv
    assert "lora_unet_output_blocks_2_2_conv.lora_down.weight" in keys  # upsampler after attention
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in keys
    assert "lora_te2_text_model_encoder_layers_1_self_attn_q_proj.lora_up.weight" in keys
    assert not any("down_blocks" in k or "up_blocks" in k for k in keys)


def generate(pipe, prompt="a photo of sks dog", seed=0):
    g = torch.Generator("cpu").manual_seed(seed)
    return pipe(prompt, num_inference_steps=2, height=64, width=64, generator=g, output_type="np").images[0]


@pytest.mark.slow
def test_sdxl_end_to_end_with_text_encoders_prior_buckets_and_both_files(tiny_model, tmp_path):
    from conftest import draw_subject
    from diffusers import StableDiffusionXLPipeline
    folder = tmp_path / "dog"
    folder.mkdir()
    for i, size in enumerate([(96, 64), (64, 96), (64, 64)]):
        draw_subject(folder / f"dog{i}.png", size=size, shift=i)
    out = tmp_path / "xl"
    r = run_script("train_dreambooth_lora.py", *xl_args(
        tiny_model, folder, out, "--max_train_steps", "4", "--checkpointing_steps", "2", "--learning_rate", "5e-2",
        "--train_text_encoder", "--with_prior_preservation", "--class_prompt", "a photo of dog",
        "--num_class_images", "2", "--class_generation_steps", "2", "--enable_bucket", "--min_bucket_reso", "32",
        "--max_bucket_reso", "96", "--bucket_reso_steps", "32", "--cache_latents", "--random_flip",
        "--validation_prompt", "a photo of sks dog", "--num_validation_images", "1", "--validation_steps", "4"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "family=SDXL" in r.stdout.splitlines()[0] and "(2 generated" in r.stdout
    assert os.path.isfile(out / "validation" / "step-000004.png")
    with safe_open(str(out / "pytorch_lora_weights.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.startswith("unet.") for k in keys)
    assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in keys)
    assert any(k.startswith("text_encoder_2.text_model.encoder.layers.") for k in keys)
    kohya = load_file(out / "xl.safetensors")
    assert any(k.startswith("lora_te1_text_model_") for k in kohya) and any(k.startswith("lora_te2_") for k in kohya)
    assert any(k.startswith("lora_unet_input_blocks_") for k in kohya)
    with safe_open(str(out / "xl.safetensors"), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    card = open(out / "README.md").read()
    assert "license: openrail++" in card and "StableDiffusionXLPipeline.from_pretrained(" in card

    base = StableDiffusionXLPipeline.from_pretrained(tiny_model["xl"])
    before = generate(base)
    images = {}
    for name, source in [("diffusers", (str(out),)), ("kohya", (str(out), "xl.safetensors")),
                         ("checkpoint", (str(out / "checkpoint-2"),))]:
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model["xl"])
        pipe.load_lora_weights(source[0], **({"weight_name": source[1]} if len(source) > 1 else {}))
        images[name] = generate(pipe)
    assert np.abs(images["diffusers"] - before).max() > 1e-3  # the LoRA changes the image
    np.testing.assert_allclose(images["kohya"], images["diffusers"], atol=2e-4)  # the kohya file is the same LoRA
    assert np.abs(images["checkpoint"] - images["diffusers"]).max() > 0  # an intermediate step, loadable too

    r = run_script("infer.py", "--base", tiny_model["xl"], "--lora", out, "--prompt", "a photo of sks dog",
                   "--num_images", "1", "--steps", "2", "--height", "64", "--width", "64", "--output", tmp_path / "img")
    assert r.returncode == 0, r.stderr[-2000:]
    assert os.path.isfile(tmp_path / "img" / "grid.png")


@pytest.mark.slow
def test_sdxl_resume_is_bit_exact_and_single_file_base_trains(tiny_model, instance_dir, tmp_path):
    extra = ["--random_flip", "--checkpointing_steps", "2", "--output_format", "diffusers",
             "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1"]
    r = run_script("train_dreambooth_lora.py", *xl_args(tiny_model, instance_dir, tmp_path / "full",
                                                         "--max_train_steps", "4", *extra))
    assert r.returncode == 0, r.stderr[-3000:]
    half = xl_args(tiny_model, instance_dir, tmp_path / "half", *extra)
    assert run_script("train_dreambooth_lora.py", *half, "--max_train_steps", "2").returncode == 0
    r = run_script("train_dreambooth_lora.py", *half, "--max_train_steps", "4", "--resume_from_checkpoint",
                   "checkpoint-2")
    assert r.returncode == 0, r.stderr[-3000:]
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "half" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    r = run_script("train_dreambooth_lora.py", *train_args(
        tiny_model["xl_single"], instance_dir, tmp_path / "single", "--single_file_config", tiny_model["xl"],
        "--max_train_steps", "1", "--report_to", "none"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "family=SDXL" in r.stdout
