"""A quantized frozen base (--quantize_base nf4|int8, --bnb_quantization_config_path): refused in one line where it
cannot work, and for every family: trains (class images sampled from the quantized base), resumes bit for bit, and
writes a LoRA that loads on the unquantized base. bitsandbytes runs NF4 and int8 on the CPU, so this is real."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import train_dreambooth_lora
from conftest import train_args

P = "train_dreambooth_lora.py: error: "


@pytest.fixture
def fails(tiny_model, instance_dir, tmp_path, capsys):
    def run(*extra, model="eps"):
        out = tmp_path / "out"
        code = train_dreambooth_lora.main([str(a) for a in train_args(tiny_model.get(model, model), instance_dir, out,
                                                                      *extra)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1 and not out.exists(), err
        return err[0].removeprefix(P)
    return run


def test_quantization_flags_are_checked_before_the_model_loads(fails, tiny_model, tmp_path, monkeypatch):
    single = tiny_model["single"]
    assert fails("--quantize_base", "nf4", model="single") == (
        f"--pretrained_model_name_or_path {single}: a quantized base loads from a diffusers folder or hub id (its "
        "weights are read tensor by tensor); convert the single file first, or drop --quantize_base")
    assert fails("--quantize_text_encoders") == "--quantize_text_encoders needs --quantize_base (or " \
                                                "--bnb_quantization_config_path)"
    config = tmp_path / "bnb.json"
    config.write_text(json.dumps({"load_in_4bit": True}))
    assert fails("--quantize_base", "nf4", "--bnb_quantization_config_path", config) == (
        "--quantize_base and --bnb_quantization_config_path both say how to quantize; give one")
    missing = tmp_path / "none.json"
    assert fails("--bnb_quantization_config_path", missing) == (
        f"--bnb_quantization_config_path {missing}: cannot read it (No such file or directory)")
    for text, line in (
            ("{load_in_4bit: true}", "not JSON (Expecting property name enclosed in double quotes: line 1 column 2 "
                                     "(char 1)); write BitsAndBytesConfig fields, e.g. {\"load_in_4bit\": true, "
                                     "\"bnb_4bit_quant_type\": \"nf4\"}"),
            ('["load_in_4bit"]', "expected a JSON object of BitsAndBytesConfig fields"),
            ('{"load_in_4bits": true}', "load_in_4bits is not a BitsAndBytesConfig field (fields: "
                                        "bnb_4bit_compute_dtype, bnb_4bit_quant_storage, bnb_4bit_quant_type, "
                                        "bnb_4bit_use_double_quant, llm_int8_enable_fp32_cpu_offload, "
                                        "llm_int8_has_fp16_weight, llm_int8_skip_modules, llm_int8_threshold, "
                                        "load_in_4bit, load_in_8bit)"),
            ('{"load_in_4bit": true, "load_in_8bit": true}', "set exactly one of load_in_4bit and load_in_8bit to true"),
            ('{"load_in_4bit": true, "bnb_4bit_quant_type": "int4"}', "bnb_4bit_quant_type must be nf4 or fp4 "
                                                                      "(got 'int4')")):
        config.write_text(text)
        assert fails("--bnb_quantization_config_path", config) == f"--bnb_quantization_config_path {config}: {line}"
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real(n, *a))
    assert fails("--quantize_base", "nf4") == "--quantize_base needs bitsandbytes: pip install bitsandbytes"
    monkeypatch.setattr(importlib.util, "find_spec", real)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert fails("--quantize_base", "int8") == (
        "--quantize_base int8: bitsandbytes has no 8-bit kernels for Apple MPS; use nf4")


def _image(pipe):
    return pipe("a photo of sks dog", num_inference_steps=2, generator=torch.Generator().manual_seed(0), height=64,
                width=64, output_type="np").images[0]


@pytest.mark.slow
@pytest.mark.parametrize("key,quantization", [("eps", "nf4"), ("xl", "int8"), ("flux", "nf4")])  # a UNet and a
# transformer family in each precision (SD 3 NF4 runs in test_sample_with_full_base_makes_the_unquantized_class_images)
def test_quantized_base_trains_resumes_and_loads_on_the_full_base(key, quantization, tiny_model, instance_dir,
                                                                  tmp_path, capsys):
    from dreambooth import families
    model = tiny_model[key]
    flags = ["--max_train_steps", "2", "--checkpointing_steps", "1", "--report_to", "none", "--quantize_base",
             quantization, "--quantize_text_encoders", "--with_prior_preservation", "--class_prompt", "a photo of dog",
             "--num_class_images", "2", "--class_generation_steps", "2", "--sample_batch_size", "2"]

    def train(out, *extra):
        return train_dreambooth_lora.main([str(a) for a in train_args(model, instance_dir, out, *flags, *extra)])
    assert train(tmp_path / "run") == 0
    started = capsys.readouterr().out
    family = families.detect(families.ModelSource(model))
    assert f"quantized base: {quantization if quantization == 'int8' else 'nf4 (double quant)'} " \
           f"({family.denoiser_name}, text_encoder" in started
    stats = json.loads((tmp_path / "run" / "train_stats.json").read_text())
    assert set(stats["phase_peaks"]) == {"load", "class_images", "caching"}
    card = (tmp_path / "run" / "README.md").read_text()
    assert "bitsandbytes) for the denoiser and the frozen text encoders; class images and validation sampled " \
           "from it" in card
    manifest = [n for n in os.listdir(tmp_path / "run" / "class_images") if n.endswith(".json")]
    assert json.loads((tmp_path / "run" / "class_images" / manifest[0]).read_text())["precision"].endswith(
        "+" + ("int8" if quantization == "int8" else "nf4 (double quant)"))
    lora = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")

    # resume from checkpoint-1 reaches the same weights, bit for bit
    (tmp_path / "resumed").mkdir()
    os.symlink(tmp_path / "run" / "class_images", tmp_path / "resumed" / "class_images")
    assert train(tmp_path / "resumed", "--max_train_steps", "1") == 0
    assert train(tmp_path / "resumed", "--resume_from_checkpoint", "latest") == 0
    again = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(again[k], lora[k]) for k in lora)

    # the LoRA loads on the unquantized base and changes its image
    pipe = family.pipeline_class().from_pretrained(model, **family.single_file_extras)
    pipe.set_progress_bar_config(disable=True)
    before = _image(pipe)
    pipe.load_lora_weights(str(tmp_path / "run"))
    assert not (_image(pipe) == before).all()


@pytest.mark.slow
def test_sample_with_full_base_makes_the_unquantized_class_images(tiny_model, instance_dir, tmp_path):
    """--sample_with_full_base: the class images are the unquantized run's (same names; pixels within 1 of 255:
    measured, one pixel of 8192 values differs by 1, a floating-point rounding, not a model difference); without it
    they come from the quantized base, under their own cache key, and differ."""
    import numpy as np
    from PIL import Image
    common = ["--max_train_steps", "1", "--report_to", "none", "--with_prior_preservation", "--class_prompt",
              "a photo of dog", "--num_class_images", "2", "--class_generation_steps", "2"]
    model = tiny_model["sd3"]
    runs = {"full": [], "full_base_sampling": ["--quantize_base", "nf4", "--sample_with_full_base"],
            "quantized_sampling": ["--quantize_base", "nf4"]}
    images = {}
    for name, extra in runs.items():
        out = tmp_path / name
        assert train_dreambooth_lora.main([str(a) for a in train_args(model, instance_dir, out, *common, *extra)]) == 0
        pngs = sorted(n for n in os.listdir(out / "class_images") if n.endswith(".png"))
        images[name] = (pngs, np.stack([np.asarray(Image.open(out / "class_images" / n), dtype=np.int16)
                                        for n in pngs]))
    assert images["full"][0] == images["full_base_sampling"][0]
    assert np.abs(images["full"][1] - images["full_base_sampling"][1]).max() <= 1
    assert images["quantized_sampling"][0] != images["full"][0]  # another cache key: never mixed with full ones
    assert np.abs(images["full"][1] - images["quantized_sampling"][1]).mean() > 1


@pytest.mark.slow
def test_quantize_text_encoders_leaves_the_ones_that_train(tiny_model, instance_dir, tmp_path, capsys):
    """Pivotal tuning gives Flux's CLIP new rows (and T5 with --enable_t5_ti): those encoders stay unquantized."""
    for extra, quantized in (([], "transformer, text_encoder_2"), (["--enable_t5_ti"], "transformer")):
        out = tmp_path / f"run{len(extra)}"
        assert train_dreambooth_lora.main([str(a) for a in train_args(
            tiny_model["flux"], instance_dir, out, "--max_train_steps", "1", "--report_to", "none", "--quantize_base",
            "nf4", "--quantize_text_encoders", "--train_text_encoder_ti", "--token_abstraction", "sks", *extra)]) == 0
        assert f"quantized base: nf4 (double quant) ({quantized});" in capsys.readouterr().out
