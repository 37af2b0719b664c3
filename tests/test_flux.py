"""Flux.1 on the family seam: diffusers' own Flux DreamBooth LoRA tests (examples/dreambooth/
test_dreambooth_lora_flux.py) and the advanced script's (examples/advanced_diffusion_training/
test_dreambooth_lora_flux_advanced.py), their command lines and assertions unchanged, our tiny Flux.1-dev in place
of hf-internal-testing/tiny-flux-pipe; and the one-line refusals the Flux issue lists."""
import json
import os
import tempfile

import pytest
import safetensors.torch
from safetensors.torch import safe_open

import train_dreambooth_lora

LORA_ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base's name


class DiffusersFluxTests:
    """The bodies of diffusers' TestDreamBoothLoRAFlux and TestDreamBoothLoRAFluxAdvanced, as written there; both
    scripts' commands run against train_dreambooth_lora.py."""
    instance_prompt = "photo"
    transformer_layer_type = "single_transformer_blocks.0.attn.to_k"
    script_path = "train_dreambooth_lora.py"

    def __init__(self, model, instance_data_dir):
        self.pretrained_model_name_or_path, self.instance_data_dir = model, instance_data_dir

    @staticmethod
    def run(test_args):
        assert train_dreambooth_lora.main(test_args[1:]) == 0

    def base(self, tmpdir, *extra):
        return f"""
            {self.script_path}
            --pretrained_model_name_or_path {self.pretrained_model_name_or_path}
            --instance_data_dir {self.instance_data_dir}
            --instance_prompt {self.instance_prompt}
            --resolution 64
            --train_batch_size 1
            --gradient_accumulation_steps 1
            --max_train_steps 2
            --learning_rate 5.0e-04
            --scale_lr
            --lr_scheduler constant
            --lr_warmup_steps 0
            --output_dir {tmpdir}
            """.split() + list(extra)

    @staticmethod
    def lora(tmpdir):
        assert os.path.isfile(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
        lora_state_dict = safetensors.torch.load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
        assert all("lora" in k for k in lora_state_dict.keys())
        return lora_state_dict

    def test_dreambooth_lora_flux(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            self.run(self.base(tmpdir))
            assert all(key.startswith("transformer") for key in self.lora(tmpdir).keys())

    def test_dreambooth_lora_text_encoder_flux(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            self.run(self.base(tmpdir, "--train_text_encoder"))
            assert all((key.startswith("transformer") or key.startswith("text_encoder"))
                       for key in self.lora(tmpdir).keys())

    def test_dreambooth_lora_latent_caching(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            self.run(self.base(tmpdir, "--cache_latents"))
            assert all(key.startswith("transformer") for key in self.lora(tmpdir).keys())

    def test_dreambooth_lora_layers(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            self.run(self.base(tmpdir, "--cache_latents", "--lora_layers", self.transformer_layer_type))
            assert all(key.startswith("transformer.single_transformer_blocks.0.attn.to_k")
                       for key in self.lora(tmpdir).keys())

    def test_dreambooth_lora_flux_checkpointing_checkpoints_total_limit(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            test_args = f"""
            {self.script_path}
            --pretrained_model_name_or_path={self.pretrained_model_name_or_path}
            --instance_data_dir={self.instance_data_dir}
            --output_dir={tmpdir}
            --instance_prompt={self.instance_prompt}
            --resolution=64
            --train_batch_size=1
            --gradient_accumulation_steps=1
            --max_train_steps=6
            --checkpoints_total_limit=2
            --checkpointing_steps=2
            """.split()
            self.run(test_args)
            assert {x for x in os.listdir(tmpdir) if "checkpoint" in x} == {"checkpoint-4", "checkpoint-6"}

    def test_dreambooth_lora_flux_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            common = f"""
            {self.script_path}
            --pretrained_model_name_or_path={self.pretrained_model_name_or_path}
            --instance_data_dir={self.instance_data_dir}
            --output_dir={tmpdir}
            --instance_prompt={self.instance_prompt}
            --resolution=64
            --train_batch_size=1
            --gradient_accumulation_steps=1
            """.split()
            self.run(common + ["--max_train_steps=4", "--checkpointing_steps=2"])
            assert {x for x in os.listdir(tmpdir) if "checkpoint" in x} == {"checkpoint-2", "checkpoint-4"}
            self.run(common + ["--max_train_steps=8", "--checkpointing_steps=2", "--resume_from_checkpoint=checkpoint-4",
                               "--checkpoints_total_limit=2"])
            assert {x for x in os.listdir(tmpdir) if "checkpoint" in x} == {"checkpoint-6", "checkpoint-8"}

    def test_dreambooth_lora_with_metadata(self):
        lora_alpha, rank = 8, 4
        with tempfile.TemporaryDirectory() as tmpdir:
            self.run(self.base(tmpdir, f"--lora_alpha={lora_alpha}", f"--rank={rank}"))
            state_dict_file = os.path.join(tmpdir, "pytorch_lora_weights.safetensors")
            assert os.path.isfile(state_dict_file)
            with safe_open(state_dict_file, framework="pt", device="cpu") as f:
                metadata = f.metadata() or {}
            metadata.pop("format", None)
            raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
            if raw:
                raw = json.loads(raw)
            assert raw["transformer.lora_alpha"] == lora_alpha
            assert raw["transformer.r"] == rank

    # the advanced script's tests (the ones above are in both files too)
    def test_dreambooth_lora_pivotal_tuning_flux_clip(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            self.run(self.base(tmpdir, "--train_text_encoder_ti"))
            assert os.path.isfile(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
            assert os.path.isfile(os.path.join(tmpdir, f"{os.path.basename(tmpdir)}_emb.safetensors"))
            assert all(key.startswith("transformer") for key in self.lora(tmpdir).keys())
            textual_inversion_state_dict = safetensors.torch.load_file(
                os.path.join(tmpdir, f"{os.path.basename(tmpdir)}_emb.safetensors"))
            assert all("clip_l" in k for k in textual_inversion_state_dict.keys())

    def test_dreambooth_lora_pivotal_tuning_flux_clip_t5(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            self.run(self.base(tmpdir, "--train_text_encoder_ti", "--enable_t5_ti"))
            assert os.path.isfile(os.path.join(tmpdir, f"{os.path.basename(tmpdir)}_emb.safetensors"))
            assert all(key.startswith("transformer") for key in self.lora(tmpdir).keys())
            textual_inversion_state_dict = safetensors.torch.load_file(
                os.path.join(tmpdir, f"{os.path.basename(tmpdir)}_emb.safetensors"))
            assert all(("clip_l" in k or "t5" in k) for k in textual_inversion_state_dict.keys())


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in vars(DiffusersFluxTests) if n.startswith("test_")])
def test_diffusers_flux_tests_pass_unchanged(name, tiny_model, imgs):
    getattr(DiffusersFluxTests(tiny_model["flux"], imgs), name)()




def test_flux_refusals_are_one_line(fails, tiny_model, tmp_path):
    import shutil
    assert fails("flux_schnell", "--guidance_scale", "3.5") == (
        "--guidance_scale: MODEL is Flux.1-schnell, which has no guidance input (only Flux.1-dev is guidance-distilled);"
        " drop the flag")
    assert fails("flux", "--max_sequence_length", "513") == (
        "--max_sequence_length 513 is above 512, the most Flux.1's pipeline takes; use 512 or less")
    assert fails("flux_schnell", "--max_sequence_length", "300") == (
        "--max_sequence_length 300 is above 256, the most Flux.1-schnell takes; use 256 or less")
    assert fails("flux", "--enable_t5_ti") == (
        "--enable_t5_ti adds T5 rows to pivotal tuning; it needs --train_text_encoder_ti")
    assert fails("eps", "--guidance_scale", "3.5") == (
        "--guidance_scale is a Flux.1 flag; --pretrained_model_name_or_path MODEL is SD 1.x/2.x: drop it")
    assert fails("flux", "--snr_gamma", "5") == (
        "--snr_gamma is an SDXL / SD 1.x/2.x flag; --pretrained_model_name_or_path MODEL is Flux.1: drop it")
    no_t5 = tmp_path / "flux-no-t5"  # a download that lost its T5
    shutil.copytree(tiny_model["flux"], no_t5)
    shutil.rmtree(no_t5 / "text_encoder_2")
    assert fails(str(no_t5)) == ("--pretrained_model_name_or_path MODEL: its text_encoder_2/ folder (T5EncoderModel) "
                                 "is missing, which Flux.1 needs; download the whole model again")


def test_flux_defaults_follow_diffusers_flux_script(tiny_model, instance_dir, tmp_path):
    from dreambooth.config import parse_args, validate
    for model, guidance, tokens in (("flux", 3.5, 512), ("flux_schnell", None, 256)):
        args = parse_args(["--pretrained_model_name_or_path", tiny_model[model], "--instance_data_dir", instance_dir,
                           "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "o")])
        args = validate(args, warn=lambda note: None).as_flags()  # the settings as resolved
        assert (args.weighting_scheme, args.guidance_scale, args.max_sequence_length, args.learning_rate,
                args.resolution) == ("none", guidance, tokens, 1e-4, 512)
        assert args.lora_target_modules.split(",")[:4] == ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0"]


def test_infer_refuses_a_flux_lora_on_an_sd_base(tiny_model, instance_dir, tmp_path, capsys):
    import infer
    out = tmp_path / "run"
    assert train_dreambooth_lora.main(["--pretrained_model_name_or_path", tiny_model["flux"], "--instance_data_dir",
                                       instance_dir, "--instance_prompt", "a photo of sks dog", "--output_dir",
                                       str(out), "--resolution", "64", "--max_train_steps", "1",
                                       "--report_to", "none"]) == 0
    capsys.readouterr()
    for model, family in (("eps", "SD 1.x/2.x"), ("sd3", "SD 3")):
        assert infer.main(["--base", tiny_model[model], "--lora", str(out), "--prompt", "a photo of sks dog",
                           "--output", str(tmp_path / "img")]) == 2
        assert capsys.readouterr().err.strip() == (
            f"infer.py: error: --lora {out} was trained for a Flux.1 base (transformer LoRA); --base "
            f"{tiny_model[model]} is {family}; give --base the model it was trained on")
    assert not (tmp_path / "img").exists()


def test_schnell_is_read_from_a_single_files_tensor_names(fails, tmp_path):
    """No transformer/config.json to read: a BFL single file without guidance_in.* is schnell, refused a
    --guidance_scale before anything loads."""
    import torch
    from safetensors.torch import save_file
    schnell = tmp_path / "flux1-schnell.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(1), "img_in.weight": torch.zeros(1)}, schnell)
    assert fails(str(schnell), "--guidance_scale", "3.5") == (
        "--guidance_scale: MODEL is Flux.1-schnell, which has no guidance input (only Flux.1-dev is "
        "guidance-distilled); drop the flag")


def test_dev_trains_with_the_guidance_value_given_even_zero(tiny_model):
    import torch
    from dreambooth.families import Flux
    from make_tiny_model import build_tiny_flux_pipeline
    family = Flux.from_pipeline(build_tiny_flux_pipeline())
    seen = []
    real = family.denoiser.forward
    family.denoiser.forward = lambda *a, **k: (seen.append(k["guidance"]), real(*a, **k))[1]
    cond = family.conditioning(family.encode(family.tokenize(["a photo of sks dog"])), {})
    for value, expected in ((None, 3.5), (0.0, 0.0), (5.0, 5.0)):
        family.options["guidance_scale"] = value
        family.denoise(family.denoiser, torch.randn(1, 16, 8, 8), torch.tensor([500.0]), cond, {})
        assert seen[-1].tolist() == [expected]
