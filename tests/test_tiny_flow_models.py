"""The tiny SD3 and Flux.1 pipelines of make_tiny_model: built offline, saved and loaded back as diffusers folders,
and runnable at the tiny size with every text path (CLIP and T5) reaching the image."""
import json

import numpy as np
import pytest
import torch

from make_tiny_model import build_tiny_flux_pipeline, build_tiny_sd3_pipeline, main

PROMPT, OTHER = "a photo of sks dog", "a red cat on the beach"
SIZE = 64  # the tiny size; any multiple of 16 works for both families


def _round_trip(pipe, folder, **load_kwargs):
    pipe.save_pretrained(folder)
    loaded = type(pipe).from_pretrained(folder, **load_kwargs)
    loaded.set_progress_bar_config(disable=True)
    return loaded


def _image(pipe, prompt, **kwargs):
    out = pipe(prompt, num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs)
    return out.images[0]


def _check_images(pipe, *single_encoder_prompts):
    """Right shape, finite, deterministic, and a different prompt gives a different image; so does a different
    prompt for one text encoder alone (prompt_2, prompt_3), so each encoder reaches the transformer."""
    image = _image(pipe, PROMPT)
    assert image.shape == (SIZE, SIZE, 3)
    assert np.isfinite(image).all()
    np.testing.assert_array_equal(image, _image(pipe, PROMPT))
    assert np.abs(image - _image(pipe, OTHER)).max() > 1e-3
    for name in single_encoder_prompts:
        # same prompt twice is bit-identical, so any difference is the encoder's; T5's few changed tokens among
        # the 256 (SD3) / 512 (Flux) padded ones move a random-weight Flux image by only ~1e-3
        assert np.abs(image - _image(pipe, PROMPT, **{name: OTHER})).max() > 1e-5, name
    return image


def _check_t5_tokenizer(folder):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(folder)
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(PROMPT).input_ids
    assert ids[-1] == 1 and ids.count(1) == 1
    assert 2 not in ids
    assert tokenizer.convert_ids_to_tokens(ids[:-1]) == ["▁a", "▁photo", "▁of", "▁sks", "▁dog"]
    assert 2 not in tokenizer("Any ASCII prompt, e.g. 'zebra #3'!").input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == PROMPT
    padded = tokenizer(PROMPT, padding="max_length", max_length=12).input_ids
    assert padded == ids + [0] * (12 - len(ids))


def _vae_config(folder):
    return json.loads((folder / "vae" / "config.json").read_text())


def test_tiny_sd3_with_t5(tmp_path):
    pipe = _round_trip(build_tiny_sd3_pipeline(seed=0), tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    _check_t5_tokenizer(tmp_path / "tokenizer_3")
    assert _vae_config(tmp_path)["shift_factor"] == pytest.approx(0.0609)
    assert _vae_config(tmp_path)["scaling_factor"] == pytest.approx(1.5305)
    assert pipe.scheduler.config.shift == 3.0
    # the pipeline pads the concatenated CLIP states to the T5 width, the transformer's joint_attention_dim
    clip_width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert clip_width <= pipe.text_encoder_3.config.d_model == pipe.transformer.config.joint_attention_dim
    assert pipe.transformer.config.pooled_projection_dim == (pipe.text_encoder.config.projection_dim
                                                             + pipe.text_encoder_2.config.projection_dim)
    assert pipe.tokenizer_2.pad_token == "!"
    _check_images(pipe, "prompt_2", "prompt_3")


def test_tiny_sd3_without_t5(tmp_path):
    built = build_tiny_sd3_pipeline(seed=0, with_t5=False)
    assert built.text_encoder_3 is None and built.tokenizer_3 is None
    # diffusers loads a null component only when told to, as for the real SD3 without T5
    pipe = _round_trip(built, tmp_path, text_encoder_3=None, tokenizer_3=None)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    assert not (tmp_path / "text_encoder_3").exists()
    assert pipe.text_encoder_3 is None
    assert _vae_config(tmp_path)["shift_factor"] == pytest.approx(0.0609)
    _check_images(pipe, "prompt_2")


@pytest.mark.parametrize("schnell", [False, True], ids=["dev", "schnell"])
def test_tiny_flux(tmp_path, schnell):
    pipe = _round_trip(build_tiny_flux_pipeline(seed=0, guidance_embeds=not schnell), tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    _check_t5_tokenizer(tmp_path / "tokenizer_2")
    assert pipe.transformer.config.guidance_embeds is (not schnell)
    assert _vae_config(tmp_path)["shift_factor"] == pytest.approx(0.1159)
    assert _vae_config(tmp_path)["scaling_factor"] == pytest.approx(0.3611)
    assert pipe.scheduler.config.use_dynamic_shifting is (not schnell)
    assert pipe.scheduler.config.shift == (1.0 if schnell else 3.0)
    assert pipe.transformer.config.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert pipe.transformer.config.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    image = _check_images(pipe, "prompt_2")  # prompt_2 is T5's
    assert np.abs(image - _image(pipe, OTHER, prompt_2=PROMPT)).max() > 1e-3  # CLIP's pooled output alone


def test_transformers_have_lora_target_names():
    """The attention projections a LoRA trainer targets, named as in the real SD3/Flux transformers."""
    for pipe in (build_tiny_sd3_pipeline(with_t5=False), build_tiny_flux_pipeline()):
        names = {n for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
        for leaf in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                     "attn.add_v_proj", "attn.to_add_out"):
            assert any(n.endswith(leaf) for n in names), (type(pipe.transformer).__name__, leaf)


def test_main_flow_families(tmp_path, capsys):
    main(["--family", "sd3", "--no_t5", "--out", str(tmp_path / "sd3")])
    assert json.loads((tmp_path / "sd3" / "model_index.json").read_text())["text_encoder_3"] == [None, None]
    main(["--family", "flux", "--schnell", "--out", str(tmp_path / "flux")])
    config = json.loads((tmp_path / "flux" / "transformer" / "config.json").read_text())
    assert config["guidance_embeds"] is False
    assert json.loads((tmp_path / "flux" / "scheduler" / "scheduler_config.json").read_text())[
        "use_dynamic_shifting"] is False
    for bad in (["--family", "sd3", "--single_file", str(tmp_path / "x.safetensors")],
                ["--family", "flux", "--single_file", str(tmp_path / "x.safetensors")],
                ["--family", "flux", "--no_t5"], ["--family", "sd3", "--schnell"], ["--family", "sd", "--no_t5"],
                ["--family", "sd3", "--prediction_type", "v_prediction"]):
        with pytest.raises(SystemExit) as err:
            main(bad + ["--out", str(tmp_path / "never")])
        assert err.value.code == 2
        assert "--" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
