"""SD 3 on the family seam: diffusers' own SD3 DreamBooth LoRA tests (examples/dreambooth/test_dreambooth_lora_sd3.py)
with their command lines and assertions unchanged, our tiny SD3 in place of hf-internal-testing/tiny-sd3-pipe; and
the one-line refusals of flags that belong to another family."""
import os
import tempfile

import pytest
import safetensors.torch

import train_dreambooth_lora



class DiffusersSD3Tests:
    """The test bodies of diffusers' TestDreamBoothLoRASD3, as written there (run_command -> our main)."""
    transformer_block_idx = 0
    layer_type = "attn.to_k"

    def __init__(self, model, instance_data_dir):
        self.pretrained_model_name_or_path = model
        self.instance_data_dir = instance_data_dir
        self.instance_prompt = "photo"
        self.script_path = "train_dreambooth_lora.py"

    @staticmethod
    def run(test_args):
        assert train_dreambooth_lora.main(test_args[1:]) == 0  # test_args[0] is the script path

    def test_dreambooth_lora_sd3(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            test_args = f"""
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
                """.split()
            self.run(test_args)
            assert os.path.isfile(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
            lora_state_dict = safetensors.torch.load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
            assert all("lora" in k for k in lora_state_dict.keys())
            assert all(key.startswith("transformer") for key in lora_state_dict.keys())

    def test_dreambooth_lora_text_encoder_sd3(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            test_args = f"""
                {self.script_path}
                --pretrained_model_name_or_path {self.pretrained_model_name_or_path}
                --instance_data_dir {self.instance_data_dir}
                --instance_prompt {self.instance_prompt}
                --resolution 64
                --train_batch_size 1
                --train_text_encoder
                --gradient_accumulation_steps 1
                --max_train_steps 2
                --learning_rate 5.0e-04
                --scale_lr
                --lr_scheduler constant
                --lr_warmup_steps 0
                --output_dir {tmpdir}
                """.split()
            self.run(test_args)
            lora_state_dict = safetensors.torch.load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
            assert all("lora" in k for k in lora_state_dict.keys())
            starts_with_expected_prefix = all(
                (key.startswith("transformer") or key.startswith("text_encoder")) for key in lora_state_dict.keys())
            assert starts_with_expected_prefix

    def test_dreambooth_lora_latent_caching(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            test_args = f"""
                {self.script_path}
                --pretrained_model_name_or_path {self.pretrained_model_name_or_path}
                --instance_data_dir {self.instance_data_dir}
                --instance_prompt {self.instance_prompt}
                --resolution 64
                --train_batch_size 1
                --gradient_accumulation_steps 1
                --max_train_steps 2
                --cache_latents
                --learning_rate 5.0e-04
                --scale_lr
                --lr_scheduler constant
                --lr_warmup_steps 0
                --output_dir {tmpdir}
                """.split()
            self.run(test_args)
            lora_state_dict = safetensors.torch.load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
            assert all("lora" in k for k in lora_state_dict.keys())
            assert all(key.startswith("transformer") for key in lora_state_dict.keys())

    def test_dreambooth_lora_block(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            test_args = f"""
                {self.script_path}
                --pretrained_model_name_or_path {self.pretrained_model_name_or_path}
                --instance_data_dir {self.instance_data_dir}
                --instance_prompt {self.instance_prompt}
                --resolution 64
                --train_batch_size 1
                --gradient_accumulation_steps 1
                --max_train_steps 2
                --lora_blocks {self.transformer_block_idx}
                --learning_rate 5.0e-04
                --scale_lr
                --lr_scheduler constant
                --lr_warmup_steps 0
                --output_dir {tmpdir}
                """.split()
            self.run(test_args)
            lora_state_dict = safetensors.torch.load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
            assert all("lora" in k for k in lora_state_dict.keys())
            assert all(key.startswith("transformer.transformer_blocks.0") for key in lora_state_dict.keys())

    def test_dreambooth_lora_layer(self):
        with tempfile.TemporaryDirectory() as tmpdir:
            test_args = f"""
                {self.script_path}
                --pretrained_model_name_or_path {self.pretrained_model_name_or_path}
                --instance_data_dir {self.instance_data_dir}
                --instance_prompt {self.instance_prompt}
                --resolution 64
                --train_batch_size 1
                --gradient_accumulation_steps 1
                --max_train_steps 2
                --lora_layers {self.layer_type}
                --learning_rate 5.0e-04
                --scale_lr
                --lr_scheduler constant
                --lr_warmup_steps 0
                --output_dir {tmpdir}
                """.split()
            self.run(test_args)
            lora_state_dict = safetensors.torch.load_file(os.path.join(tmpdir, "pytorch_lora_weights.safetensors"))
            assert all("lora" in k for k in lora_state_dict.keys())
            assert all("attn.to_k" in key for key in lora_state_dict.keys())

    def test_dreambooth_lora_sd3_checkpointing_checkpoints_total_limit(self):
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

    def test_dreambooth_lora_sd3_checkpointing_checkpoints_total_limit_removes_multiple_checkpoints(self):
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
            --max_train_steps=4
            --checkpointing_steps=2
            """.split()
            self.run(test_args)
            assert {x for x in os.listdir(tmpdir) if "checkpoint" in x} == {"checkpoint-2", "checkpoint-4"}
            resume_run_args = f"""
            {self.script_path}
            --pretrained_model_name_or_path={self.pretrained_model_name_or_path}
            --instance_data_dir={self.instance_data_dir}
            --output_dir={tmpdir}
            --instance_prompt={self.instance_prompt}
            --resolution=64
            --train_batch_size=1
            --gradient_accumulation_steps=1
            --max_train_steps=8
            --checkpointing_steps=2
            --resume_from_checkpoint=checkpoint-4
            --checkpoints_total_limit=2
            """.split()
            self.run(resume_run_args)
            assert {x for x in os.listdir(tmpdir) if "checkpoint" in x} == {"checkpoint-6", "checkpoint-8"}


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in vars(DiffusersSD3Tests) if n.startswith("test_")])
def test_diffusers_sd3_tests_pass_unchanged(name, tiny_model, imgs):
    getattr(DiffusersSD3Tests(tiny_model["sd3"], imgs), name)()


def test_flags_of_another_family_are_refused_in_one_line(fails):
    assert fails("eps", "--weighting_scheme", "logit_normal") == (
        "--weighting_scheme is an SD 3 / Flux.1 flag; --pretrained_model_name_or_path MODEL is SD 1.x/2.x: drop it")
    assert fails("xl", "--max_sequence_length", "77") == (
        "--max_sequence_length is an SD 3 / Flux.1 flag; --pretrained_model_name_or_path MODEL is SDXL: drop it")
    assert fails("eps", "--lora_blocks", "0") == (
        "--lora_blocks is an SD 3 flag; --pretrained_model_name_or_path MODEL is SD 1.x/2.x: drop it")
    assert fails("sd3", "--snr_gamma", "5") == (
        "--snr_gamma is an SDXL / SD 1.x/2.x flag; --pretrained_model_name_or_path MODEL is SD 3: drop it")
    assert fails("sd3", "--prediction_type", "v_prediction") == (
        "--prediction_type is an SDXL / SD 1.x/2.x flag; --pretrained_model_name_or_path MODEL is SD 3: drop it")
    assert fails("sd3", "--noise_offset", "0.1") == (
        "--noise_offset is an SDXL / SD 1.x/2.x flag; --pretrained_model_name_or_path MODEL is SD 3: drop it")
    assert fails("sd3", "--text_encoder_use_attention_mask") == (
        "--text_encoder_use_attention_mask is an SDXL / SD 1.x/2.x flag; --pretrained_model_name_or_path MODEL is "
        "SD 3: drop it")
    assert fails("sd3", "--crops_coords_top_left_h", "0") == (
        "--crops_coords_top_left_h is an SDXL flag; --pretrained_model_name_or_path MODEL is SD 3: drop it")


def test_sd3_flag_values_are_checked_before_the_model_loads(fails):
    assert fails("sd3", "--max_sequence_length", "600") == (
        "--max_sequence_length 600 is above 512, the most SD 3's pipeline takes; use 512 or less")
    assert fails("sd3", "--max_sequence_length", "0") == "--max_sequence_length must be >= 1 (got 0)"
    assert fails("sd3", "--lora_blocks", "0,x") == "--lora_blocks 0,x: give block numbers, e.g. --lora_blocks 0,1,12"
    assert fails("sd3", "--lora_layers", "attn.to_q", "--lora_target_modules", "attn.to_k") == (
        "--lora_layers and --lora_target_modules name the same thing; give one of them")
    assert fails("sd3", "--weighting_scheme", "uniform").startswith(
        "argument --weighting_scheme: invalid choice: 'uniform'")


def test_sd3_targets_are_checked_after_load_with_the_flag_the_user_gave(fails):
    assert fails("sd3", "--lora_blocks", "7") == (
        "--lora_blocks: no SD3Transformer2DModel module named transformer_blocks.7.attn.add_k_proj; the default for "
        "this model is attn.add_k_proj,attn.add_q_proj,attn.add_v_proj,attn.to_add_out,attn.to_k,attn.to_out.0,"
        "attn.to_q,attn.to_v")
    assert fails("sd3", "--lora_layers", "attn.qkv").startswith(
        "--lora_layers: no SD3Transformer2DModel module named attn.qkv;")


def test_sd3_defaults_follow_diffusers_sd3_script(tiny_model, instance_dir, tmp_path):
    from dreambooth.config import parse_args, validate
    args = parse_args(["--pretrained_model_name_or_path", tiny_model["sd3"], "--instance_data_dir", instance_dir,
                       "--instance_prompt", "a photo of sks dog", "--output_dir", str(tmp_path / "o")])
    args = validate(args, warn=lambda note: None).as_flags()  # the settings as resolved
    assert (args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, args.precondition_outputs,
            args.max_sequence_length) == ("logit_normal", 0.0, 1.0, 1.29, 1, 77)
    assert (args.learning_rate, args.text_encoder_lr, args.adam_weight_decay, args.adam_weight_decay_text_encoder,
            args.resolution) == (1e-4, 5e-6, 1e-4, 1e-3, 512)
    assert args.lora_target_modules.split(",") == ["attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj",
                                                   "attn.to_add_out", "attn.to_k", "attn.to_out.0", "attn.to_q",
                                                   "attn.to_v"]
    assert args.noise_offset is None and args.snr_gamma is None


def test_infer_refuses_an_sd3_lora_on_an_sdxl_base_in_one_line(tiny_model, instance_dir, tmp_path, capsys):
    import infer
    out = tmp_path / "run"
    assert train_dreambooth_lora.main(["--pretrained_model_name_or_path", tiny_model["sd3"], "--instance_data_dir",
                                       instance_dir, "--instance_prompt", "a photo of sks dog", "--output_dir",
                                       str(out), "--resolution", "64", "--max_train_steps", "1",
                                       "--report_to", "none"]) == 0
    capsys.readouterr()
    for lora, model in ((out, "xl"), (out / "run.safetensors", "eps")):
        assert infer.main(["--base", tiny_model[model], "--lora", str(lora), "--prompt", "a photo of sks dog",
                           "--output", str(tmp_path / "img")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        family = "SDXL" if model == "xl" else "SD 1.x/2.x"
        assert err == [f"infer.py: error: --lora {lora} was trained for an SD 3 base (transformer LoRA); --base "
                       f"{tiny_model[model]} is {family}; give --base the model it was trained on"]
    assert not (tmp_path / "img").exists()
    assert infer.main(["--base", tiny_model["sd3"], "--lora", str(out), "--prompt", "x", "--scheduler", "euler",
                       "--output", str(tmp_path / "img")]) == 2
    assert capsys.readouterr().err.strip() == (
        "infer.py: error: --scheduler euler: SD 3 is a flow-matching model and samples with its own scheduler; "
        "leave --scheduler out (or give 'default')")


@pytest.mark.slow
def test_sd3_pivotal_tuning_buckets_and_the_tokens_in_infer(tiny_model, tmp_path, capsys):
    """Pivotal tuning on SD 3's two CLIPs (T5 reads the new tokens as word pieces), with aspect-ratio buckets; the
    embeddings file has clip_l and clip_g, and infer.py loads it from the run folder and rewrites the prompt."""
    import infer
    from conftest import draw_subject
    photos = tmp_path / "photos"
    photos.mkdir()
    for i, size in enumerate([(96, 64), (64, 96), (80, 80)]):
        draw_subject(photos / f"p{i}.png", size=size, shift=i)
    out = tmp_path / "run"
    assert train_dreambooth_lora.main([
        "--pretrained_model_name_or_path", tiny_model["sd3"], "--instance_data_dir", str(photos), "--instance_prompt",
        "a photo of TOK dog", "--output_dir", str(out), "--resolution", "64", "--enable_bucket", "--min_bucket_reso",
        "32", "--max_bucket_reso", "96", "--bucket_reso_steps", "16", "--train_text_encoder_ti", "--max_train_steps",
        "2", "--report_to", "none"]) == 0
    emb = safetensors.torch.load_file(out / "run_emb.safetensors")
    assert sorted(emb) == ["clip_g", "clip_l"] and emb["clip_l"].shape[0] == 2 and emb["clip_g"].shape[0] == 2
    capsys.readouterr()
    assert infer.main(["--base", tiny_model["sd3"], "--lora", str(out), "--prompt", "a photo of TOK dog", "--num_images",
                       "1", "--steps", "2", "--height", "64", "--width", "64", "--output", str(tmp_path / "img")]) == 0
    assert "new tokens loaded: TOK -> <s0><s1>" in capsys.readouterr().err
    # the model card's diffusers snippet runs as written (SD 3's pipeline has no load_textual_inversion: the card
    # defines the steps), with the pipeline call cut to 2 steps at 64 px
    card = (out / "README.md").read_text()
    snippet = card.split("## Use it with diffusers")[1].split("```python\n")[1].split("```")[0]
    assert 'add_rows(emb["clip_g"], token=["<s0>", "<s1>"], text_encoder=pipe.text_encoder_2' in snippet
    snippet = snippet.replace('in a bucket")', 'in a bucket", num_inference_steps=2, height=64, width=64)')
    scope = {}
    exec(snippet, scope)
    assert scope["image"].size == (64, 64)
