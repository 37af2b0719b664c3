"""The SDXL family, on the tiny SDXL pipeline of the real classes (two CLIP encoders, the `text_time` added
conditioning; examples/make_tiny_model.py --family sdxl, built once per session by conftest): the pipeline's
architecture and the SDXL facts in dreambooth/families/SDXL_NOTES.md (generation, prompt encoding, one
training-style UNet forward with the micro-conditioning, the single-file round trip, LoRA files in the diffusers
and kohya layouts loading in diffusers); then the trainer's seam: detection, conditioning, kohya names, and
end-to-end runs of the trainer and infer.py, with an exact resume."""
import os
import re

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import run_main, run_script, train_args

pytestmark = pytest.mark.filterwarnings("ignore")
PROMPT = "a photo of sks dog"
LORA_UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TEXT_MODULES = ["q_proj", "k_proj", "v_proj", "out_proj"]


@pytest.fixture(scope="module")
def sdxl(tiny_model, tmp_path_factory):
    """The session's tiny SDXL folder and single file, and a folder for this module's LoRA files."""
    return {"dir": tiny_model["xl"], "single": tiny_model["xl_single"], "tmp": tmp_path_factory.mktemp("sdxl")}


# ---- the tiny SDXL pipeline and the SDXL facts ------------------------------------------------------------------


def load(path):
    from diffusers import StableDiffusionXLPipeline
    pipe = StableDiffusionXLPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images_of(pipe, steps=2):
    return pipe(PROMPT, num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def test_builder_has_sdxl_architecture(sdxl):
    pipe = load(sdxl["dir"])
    te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
    assert type(pipe).__name__ == "StableDiffusionXLPipeline"
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert te1.hidden_size != te2.hidden_size
    assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
    assert unet.addition_embed_type == "text_time"
    assert unet.projection_class_embeddings_input_dim == 6 * unet.addition_time_embed_dim + te2.projection_dim
    assert unet.down_block_types == ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
    assert unet.layers_per_block == 2
    assert pipe.vae_scale_factor == 8
    assert pipe.tokenizer_2.pad_token == "!" and pipe.tokenizer.pad_token == "<|endoftext|>"
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert (sched.beta_schedule, sched.beta_start, sched.beta_end, sched.steps_offset, sched.timestep_spacing) == \
        ("scaled_linear", 0.00085, 0.012, 1, "leading")
    assert pipe.config.force_zeros_for_empty_prompt


def test_generates_64px_image(sdxl):
    image = images_of(load(sdxl["dir"]))
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(torch.from_numpy(image)).all()


def sdxl_text_conditioning(pipe, prompt):
    """What a trainer computes per caption: penultimate hidden states of both encoders, concatenated on the
    feature axis; the pooled (projected) output of text_encoder_2 (its `text_embeds`, output[0])."""
    hidden, pooled = [], None
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
    return torch.cat(hidden, dim=-1), pooled


def test_encode_prompt_widths_and_manual_encoding_match(sdxl):
    pipe = load(sdxl["dir"])
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=True)
        mine, my_pooled = sdxl_text_conditioning(pipe, PROMPT)
    te1, te2 = pipe.text_encoder.config, pipe.text_encoder_2.config
    assert embeds.shape == (1, 77, te1.hidden_size + te2.hidden_size)
    assert pooled.shape == (1, te2.projection_dim)
    assert torch.equal(embeds, mine) and torch.equal(pooled, my_pooled)
    # force_zeros_for_empty_prompt: no negative prompt -> all-zero unconditional embeddings
    assert not negative.any() and not negative_pooled.any()


def test_unet_forward_with_added_cond_kwargs(sdxl):
    """One training-style UNet call with SDXL's micro-conditioning (the snippet in dreambooth/families/SDXL_NOTES.md)."""
    pipe = load(sdxl["dir"])
    with torch.no_grad():
        prompt_embeds, pooled = sdxl_text_conditioning(pipe, [PROMPT, PROMPT])
        # (original_size + crops_coords_top_left + target_size), as in the pipeline's _get_add_time_ids
        time_ids = torch.tensor([[64, 64, 0, 0, 64, 64], [80, 64, 0, 8, 64, 64]], dtype=prompt_embeds.dtype)
        assert torch.equal(time_ids[:1], pipe._get_add_time_ids(
            (64, 64), (0, 0), (64, 64), dtype=prompt_embeds.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim))
        latents = torch.randn(2, 4, 8, 8)
        timesteps = torch.tensor([10, 500])
        pred = pipe.unet(latents, timesteps, encoder_hidden_states=prompt_embeds,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        assert pred.shape == latents.shape and torch.isfinite(pred).all()
        # the micro-conditioning reaches the output
        other = pipe.unet(latents, timesteps, encoder_hidden_states=prompt_embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids.flip(0)}).sample
        assert not torch.allclose(pred, other)


def test_single_file_round_trip(sdxl):
    from diffusers import StableDiffusionXLPipeline
    a = load(sdxl["dir"])
    b = StableDiffusionXLPipeline.from_single_file(sdxl["single"], config=sdxl["dir"], local_files_only=True)
    b.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert sa.keys() == sb.keys(), name
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    assert (images_of(a) == images_of(b)).all()


def add_random_lora(pipe, r=2, alpha=2):
    from peft import LoraConfig
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                                     target_modules=LORA_UNET_MODULES))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        encoder.add_adapter(LoraConfig(r=r, lora_alpha=alpha, init_lora_weights=False,
                                       target_modules=LORA_TEXT_MODULES))


def diffusers_lora_layers(pipe):
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    return {name: convert_state_dict_to_diffusers(get_peft_model_state_dict(getattr(pipe, name)))
            for name in ("unet", "text_encoder", "text_encoder_2")}


@pytest.fixture(scope="module")
def trained(sdxl):
    """A LoRA on all three models, saved the diffusers way; plus the base and LoRA images."""
    from diffusers import StableDiffusionXLPipeline
    pipe = load(sdxl["dir"])
    base = images_of(pipe)
    add_random_lora(pipe)
    with_lora = images_of(pipe)
    layers = diffusers_lora_layers(pipe)
    out = sdxl["tmp"] / "lora-diffusers"
    StableDiffusionXLPipeline.save_lora_weights(out, unet_lora_layers=layers["unet"],
                                                text_encoder_lora_layers=layers["text_encoder"],
                                                text_encoder_2_lora_layers=layers["text_encoder_2"])
    return {"file": str(out / "pytorch_lora_weights.safetensors"), "base": base, "lora": with_lora,
            "layers": layers, "pipe": pipe}


def test_diffusers_lora_file_keys_and_reload(sdxl, trained):
    from safetensors.torch import load_file
    keys = list(load_file(trained["file"]))
    assert {k.split(".")[0] for k in keys} == {"unet", "text_encoder", "text_encoder_2"}
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight" in keys
    assert "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight" in keys
    # transformers 5: CLIPTextModel has no .text_model level, CLIPTextModelWithProjection still has one;
    # the saved keys follow the module paths, and diffusers' loader strips "text_model." when it must.
    # (convert_state_dict_to_diffusers names text-encoder LoRA halves lora_linear_layer.down/up, UNet ones lora.down/up)
    assert "text_encoder.encoder.layers.0.self_attn.q_proj.lora_linear_layer.down.weight" in keys
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_linear_layer.up.weight" in keys
    assert not hasattr(trained["pipe"].text_encoder, "text_model")
    assert hasattr(trained["pipe"].text_encoder_2, "text_model")

    fresh = load(sdxl["dir"])
    fresh.load_lora_weights(trained["file"])
    image = images_of(fresh)
    assert abs(image - trained["base"]).max() > 1e-3
    assert abs(image - trained["lora"]).max() < 1e-5


def test_diffusers_lora_with_text_model_prefix_loads(sdxl, trained):
    """Files written with older transformers (text_encoder.text_model.encoder...) still load into the flattened
    CLIPTextModel."""
    from safetensors.torch import load_file
    state = {(k.replace("text_encoder.", "text_encoder.text_model.", 1) if k.startswith("text_encoder.") else k): v
             for k, v in load_file(trained["file"]).items()}
    fresh = load(sdxl["dir"])
    fresh.load_lora_weights(state)
    assert abs(images_of(fresh) - trained["lora"]).max() < 1e-5


def to_kohya(pipe, layers, sgm_unet_names, alpha=2.0):
    """diffusers LoRA layers -> kohya sd-scripts names: lora_unet_<module>, lora_te1_/lora_te2_text_model_<module>,
    with '.' -> '_', lora_down/lora_up and a per-module alpha. UNet modules in SGM (LDM) names when sgm_unet_names."""
    from single_file import unet_to_original
    out = {}
    for name, state in layers.items():
        for key, value in state.items():
            module, kind = re.split(r"\.lora(?:_linear_layer)?\.", key)  # kind: down.weight / up.weight
            if name == "unet":
                if sgm_unet_names:
                    module = next(iter(unet_to_original({module + ".weight": None}, pipe.unet.config))).removesuffix(
                        ".weight")
                prefix = "lora_unet_"
            else:
                module = module if module.startswith("text_model.") else "text_model." + module
                prefix = "lora_te1_" if name == "text_encoder" else "lora_te2_"
            lora_name = prefix + module.replace(".", "_")
            out[f"{lora_name}.lora_{kind}"] = value
            out[f"{lora_name}.alpha"] = torch.tensor(alpha)
    return out


@pytest.mark.parametrize("sgm_unet_names", [True, False], ids=["sgm-unet-names", "diffusers-unet-names"])
def test_kohya_lora_loads(sdxl, trained, sgm_unet_names, tmp_path):
    from safetensors.torch import save_file
    state = to_kohya(trained["pipe"], trained["layers"], sgm_unet_names)
    if sgm_unet_names:
        for key in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.lora_down.weight",
                    "lora_unet_input_blocks_8_1_transformer_blocks_1_attn2_to_out_0.lora_up.weight",
                    "lora_unet_middle_block_1_transformer_blocks_1_attn1_to_k.alpha",
                    "lora_unet_output_blocks_0_1_transformer_blocks_0_attn2_to_v.lora_down.weight",
                    "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_q.lora_down.weight"):
            assert key in state, key
    else:
        assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in state
    assert "lora_te2_text_model_encoder_layers_1_self_attn_out_proj.alpha" in state
    path = tmp_path / "kohya.safetensors"
    save_file(state, str(path))
    fresh = load(sdxl["dir"])
    fresh.load_lora_weights(str(path))
    assert abs(images_of(fresh) - trained["lora"]).max() < 1e-5


def test_sd_single_file_unchanged(tiny_model):
    """The SD 1.x writer still round-trips after the SDXL additions to examples/single_file.py (conftest's tiny SD
    folder and the single file written beside it)."""
    from diffusers import StableDiffusionPipeline
    a = StableDiffusionPipeline.from_pretrained(tiny_model["eps"])
    b = StableDiffusionPipeline.from_single_file(tiny_model["single"], config=tiny_model["eps"],
                                                 local_files_only=True)
    sa, sb = a.unet.state_dict(), b.unet.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)



# ---- SDXL through the model-family seam and the trainer ----------------------------------------------------


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
    r = run_main(*xl_args(
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
def test_sdxl_resume_is_bit_exact_and_single_file_base_trains(tiny_model, instance_dir, tmp_path, in_process, capsys):
    """The four runs in this process (each main() seeds its own RNGs; a resume restores the checkpoint's): a
    subprocess each paid seconds of imports."""
    extra = ["--random_flip", "--checkpointing_steps", "2", "--output_format", "diffusers",
             "--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "1"]
    assert in_process(xl_args(tiny_model, instance_dir, str(tmp_path / "full"), "--max_train_steps", "4", *extra)) == 0, \
        capsys.readouterr().err[-3000:]
    half = xl_args(tiny_model, instance_dir, str(tmp_path / "half"), *extra)
    assert in_process([*half, "--max_train_steps", "2"]) == 0
    code = in_process([*half, "--max_train_steps", "4", "--resume_from_checkpoint", "checkpoint-2"])
    assert code == 0, capsys.readouterr().err[-3000:]
    a = load_file(tmp_path / "full" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "half" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    capsys.readouterr()
    code = in_process(train_args(tiny_model["xl_single"], instance_dir, str(tmp_path / "single"), "--single_file_config",
                                 tiny_model["xl"], "--max_train_steps", "1", "--report_to", "none"))
    r = capsys.readouterr()
    assert code == 0, r.err[-3000:]
    assert "family=SDXL" in r.out
