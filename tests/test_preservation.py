"""Prior preservation from the base model's own output (--prior_preservation_mode base_output), caption dropout and
an EMA of the LoRA: what each computes, and that runs with them resume bit for bit."""
import json
from argparse import Namespace

import pytest
import torch
from safetensors.torch import load_file

import train_dreambooth_lora
from conftest import train_args
from dreambooth import models, training

P = "train_dreambooth_lora.py: error: "


def _family(builder_name):
    import make_tiny_model
    from dreambooth import families
    pipe = getattr(make_tiny_model, builder_name)()
    family = families.family_of_pipeline(pipe).from_pipeline(pipe)
    family.freeze()
    models.add_lora(family.denoiser, family.text_encoders, Namespace(
        rank=4, lora_alpha=None, lora_dropout=0.0, use_dora=False, train_text_encoder=False,
        lora_target_modules=family.default_lora_targets))
    return family


@pytest.mark.parametrize("builder", ["build_tiny_pipeline", "build_tiny_flux_pipeline"])
def test_base_output_prior_rows_score_the_lora_against_the_base(builder):
    """At the LoRA's start (its B matrices are zero) the LoRA model is the base model, so the prior rows add
    nothing and the loss is the instance loss; once the LoRA moves, the prior rows measure how far it moved the
    class prompt's prediction, and their gradient reaches the LoRA."""
    from dreambooth.families import PromptEncoder
    family = _family(builder)
    prompts = PromptEncoder(family, ["a photo of sks dog", "a photo of dog"])
    g = torch.Generator().manual_seed(3)
    batch = {"images": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1, "prompt_ids": torch.tensor([0, 0]),
             "original_sizes": torch.tensor([[64, 64]] * 2), "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long),
             "target_sizes": torch.tensor([[64, 64]] * 2)}
    objective = family.objective()

    def loss(prior_id, weight=1.0):
        torch.manual_seed(0)
        return training.training_loss(family, family.denoiser, objective, prompts, batch, weight, device="cpu",
                                      weight_dtype=torch.float32, cached_latents=False, with_class_images=False,
                                      prior_prompt_id=prior_id)
    plain = loss(None)
    torch.testing.assert_close(loss(1), plain, rtol=1e-5, atol=1e-6)  # prior rows: exactly the base, loss 0
    for name, p in family.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    moved_plain, moved = loss(None), loss(1, weight=1.0)
    assert moved > moved_plain  # the prior rows now cost something
    moved.backward()
    assert all(p.grad is not None for n, p in family.denoiser.named_parameters() if "lora_" in n)
    assert all(p.requires_grad for n, p in family.denoiser.named_parameters() if "lora_" in n)  # adapters back on


def test_caption_dropout_is_seeded_and_takes_the_empty_prompt(tmp_path):
    from conftest import draw_subject
    from dreambooth.data import DreamBoothDataset
    paths = [str(draw_subject(tmp_path / f"d{i}.png")) for i in range(4)]
    data = DreamBoothDataset(paths, "a photo of sks dog", resolution=64, repeats=50, seed=7, caption_dropout_rate=0.3)
    assert data.prompts == ["a photo of sks dog", ""]
    ids = [data[(0, i)]["instance_prompt_id"] for i in range(len(data))]
    assert 0.2 < ids.count(data.empty_prompt_id) / len(ids) < 0.4
    assert ids == [data[(0, i)]["instance_prompt_id"] for i in range(len(data))]  # the same draw every time
    assert ids != [data[(1, i)]["instance_prompt_id"] for i in range(len(data))]  # another epoch, another draw
    plain = DreamBoothDataset(paths, "a photo of sks dog", resolution=64, seed=7)
    assert plain.prompts == ["a photo of sks dog"] and plain.empty_prompt_id is None


def test_base_output_flags_are_checked(tiny_model, instance_dir, tmp_path, capsys):
    def fails(*extra):
        out = tmp_path / "out"
        assert train_dreambooth_lora.main([str(a) for a in train_args(tiny_model["eps"], instance_dir, out,
                                                                      *extra)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and not out.exists()
        return err[0].removeprefix(P)
    assert fails("--prior_preservation_mode", "base_output") == (
        "--prior_preservation_mode base_output needs --with_prior_preservation (and --class_prompt)")
    assert fails("--caption_dropout_rate", "1") == "--caption_dropout_rate must be in [0, 1) (got 1.0)"
    assert fails("--use_ema", "--ema_decay", "1.5") == "--ema_decay must be in [0, 1) (got 1.5)"
    assert fails("--train_transformer_frac", "0.5") == (
        "--train_transformer_frac 0.5: after that share of the steps nothing would train; it is for runs that also "
        "train text encoders or new tokens (--train_text_encoder_ti, --train_text_encoder)")
    assert fails("--enable_npu_flash_attention") == (
        "--enable_npu_flash_attention is for Huawei Ascend NPUs, which this trainer does not run on; drop the flag "
        "(PyTorch SDPA attention is used)")


def test_class_image_flags_are_named_as_unused_with_base_output(tiny_model, instance_dir, tmp_path):
    from dreambooth.config import parse_args, validate
    args = parse_args([str(a) for a in train_args(tiny_model["eps"], instance_dir, tmp_path / "o",
                                                  "--with_prior_preservation", "--class_prompt", "dog",
                                                  "--prior_preservation_mode", "base_output", "--num_class_images",
                                                  "50", "--class_generation_steps", "10", "--class_data_dir",
                                                  str(tmp_path / "cls"))])
    notes = []
    validate(args, warn=notes.append)
    assert notes == [f"warning: --{f} has no effect with --prior_preservation_mode base_output (it generates no "
                     "class images)" for f in ("class_data_dir", "num_class_images", "class_generation_steps")]


@pytest.mark.slow
@pytest.mark.parametrize("key", ["eps", "sd3"])
def test_base_output_ema_and_caption_dropout_runs_resume_bit_exact(key, tiny_model, instance_dir, tmp_path, capsys):
    flags = ["--max_train_steps", "3", "--checkpointing_steps", "1", "--report_to", "none", "--train_batch_size", "2",
             "--with_prior_preservation", "--prior_preservation_mode", "base_output", "--class_prompt",
             "a photo of dog", "--use_ema", "--ema_decay", "0.9", "--caption_dropout_rate", "0.3"]

    def train(out, *extra):
        return train_dreambooth_lora.main([str(a) for a in train_args(tiny_model[key], instance_dir, out, *flags,
                                                                      *extra)])
    assert train(tmp_path / "run") == 0
    assert "prior=base_output" in capsys.readouterr().out
    assert not (tmp_path / "run" / "class_images").exists()
    card = (tmp_path / "run" / "README.md").read_text()
    assert "the base model's own output as the target (no class images)" in card
    final = load_file(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    live = load_file(tmp_path / "run" / "checkpoint-3" / "pytorch_lora_weights.safetensors")
    assert final.keys() == live.keys() and any(not torch.equal(final[k], live[k]) for k in final)  # the EMA's
    assert train(tmp_path / "resumed", "--max_train_steps", "1") == 0
    assert train(tmp_path / "resumed", "--resume_from_checkpoint", "latest") == 0
    again = load_file(tmp_path / "resumed" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(again[k], final[k]) for k in final)
    saved = json.loads((tmp_path / "run" / "checkpoint-1" / "lora_settings.json").read_text())
    assert saved["use_ema"] is True
    capsys.readouterr()
    assert train_dreambooth_lora.main([str(a) for a in train_args(
        tiny_model[key], instance_dir, tmp_path / "run", *flags[:-5], "--caption_dropout_rate", "0.3",
        "--max_train_steps", "4", "--resume_from_checkpoint", "latest")]) == 2
    assert "was saved with --use_ema; this run has no --use_ema" in capsys.readouterr().err
