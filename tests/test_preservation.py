"""Prior preservation from the base model's own output (--prior_preservation_mode base_output), caption dropout and
an EMA of the LoRA: what each computes, and that runs with them resume bit for bit."""
import json
import os
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


def _paths(family, prompts, class_ids, uncond_id, num_paths=2, steps=3, guidance=3.0, size=(8, 8)):
    from dreambooth import base_prior

    def extras(n):
        hw = torch.tensor([[size[0] * family.vae_scale(), size[1] * family.vae_scale()]] * n)
        return {"original_sizes": hw, "crop_top_lefts": torch.zeros_like(hw), "target_sizes": hw}
    with training.adapters_off([family.denoiser]):
        return base_prior.sample_paths(family, family.denoiser, prompts, class_ids, uncond_id, num_paths=num_paths,
                                       steps=steps, guidance=guidance,
                                       latent_shape=(family.vae.config.latent_channels, *size), batch_extras=extras,
                                       batch_size=2, seed=5, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("builder", ["build_tiny_pipeline", "build_tiny_sdxl_pipeline", "build_tiny_sd3_pipeline",
                                     "build_tiny_flux_pipeline"])
def test_base_output_prior_rows_score_the_lora_against_the_base(builder):
    """At the LoRA's start (its B matrices are zero) the LoRA model is the base model, so the prior rows add
    nothing and the loss is the instance loss; once the LoRA moves, the prior rows measure how far it moved the
    base's predictions on its own class-prompt paths (and the empty prompt's, where the family guides from it),
    and their gradient reaches the LoRA. Every family: its sampler, packing and conditioning."""
    from dreambooth.families import PromptEncoder
    family = _family(builder)
    guided = family.samples_with_guidance
    prompts = PromptEncoder(family, ["a photo of sks dog", "a photo of dog"] + ([""] if guided else []),
                            zero_ids=(2,) if guided and family.empty_prompt_is_zeros else ())
    size = 8 * family.vae_scale()
    bank = _paths(family, prompts, [1], 2 if guided else None)
    steps = 3
    assert len(bank) == 2 * steps and bank.states.shape == (2 * steps, family.vae.config.latent_channels, 8, 8)
    assert (bank.uncond is not None) == guided and bank.prompt_ids.tolist() == [1] * (2 * steps)
    g = torch.Generator().manual_seed(3)
    batch = {"images": torch.rand(2, 3, size, size, generator=g) * 2 - 1, "prompt_ids": torch.tensor([0, 0]),
             "original_sizes": torch.tensor([[size, size]] * 2), "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long),
             "target_sizes": torch.tensor([[size, size]] * 2)}
    objective = family.objective()
    rows = bank.rows(range(2), "cpu", torch.float32)
    assert rows[0].shape[0] == (4 if guided else 2) and rows[2].tolist() == [1, 1] + ([2, 2] if guided else [])

    def loss(prior_rows, weight=1.0):
        torch.manual_seed(0)
        return training.training_loss(family, family.denoiser, objective, prompts, batch, weight, device="cpu",
                                      weight_dtype=torch.float32, cached_latents=False, with_class_images=False,
                                      prior_rows=prior_rows)
    plain = loss(None)
    torch.testing.assert_close(loss(rows), plain, rtol=1e-5, atol=1e-6)  # prior rows: exactly the base, loss 0
    for name, p in family.denoiser.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    moved_plain, moved = loss(None), loss(rows, weight=1.0)
    assert moved > moved_plain  # the prior rows now cost something
    moved.backward()
    assert all(p.grad is not None for n, p in family.denoiser.named_parameters() if "lora_" in n)
    assert all(p.requires_grad for n, p in family.denoiser.named_parameters() if "lora_" in n)  # adapters back on


@pytest.mark.parametrize("builder", ["build_tiny_pipeline", "build_tiny_sdxl_pipeline", "build_tiny_sd3_pipeline",
                                     "build_tiny_flux_pipeline"])
def test_base_output_paths_are_the_pipelines_own_sampling(builder):
    """The prior's states are the latents the family's own pipeline passes through when it draws the class prompt
    from the same noise with its own defaults (sampler and its schedule, Flux's shifted sigmas, classifier-free
    guidance at the pipeline's default scale from SDXL's all-zero empty prompt or the encoded one), and its targets
    are the base's predictions there: the LoRA is held where class images would have come from, without drawing
    them."""
    from diffusers import FluxPipeline
    from dreambooth import base_prior
    from dreambooth.families import PromptEncoder
    family = _family(builder)
    guided = family.samples_with_guidance
    prompts = PromptEncoder(family, ["a photo of sks dog", "a photo of dog"] + ([""] if guided else []),
                            zero_ids=(2,) if guided and family.empty_prompt_is_zeros else ())
    channels, side, steps = family.vae.config.latent_channels, 8, 3
    with training.adapters_off([family.denoiser]):
        bank = _paths(family, prompts, [1], 2 if guided else None, num_paths=1, steps=steps,
                      guidance=base_prior.guidance_scale(family), size=(side, side))
        sampler = family.sampling_pipeline()
        noise = torch.randn((1, channels, side, side), generator=torch.Generator().manual_seed(5 * 100003))
        flux = isinstance(sampler, FluxPipeline)
        pixels = side * family.vae_scale()
        extra = {"max_sequence_length": family.t5_max_length()} if hasattr(family, "t5_max_length") else {}
        seen = []
        sampler(prompt="a photo of dog", num_inference_steps=steps, height=pixels, width=pixels, output_type="latent",
                latents=FluxPipeline._pack_latents(noise, 1, channels, side, side) if flux else noise.clone(),
                callback_on_step_end=lambda p, i, t, kw: seen.append(kw["latents"].clone()) or kw, **extra)
    if flux:
        seen = [FluxPipeline._unpack_latents(x, pixels, pixels, family.vae_scale()) for x in seen]
    torch.testing.assert_close(bank.states[0], noise[0])
    for k in range(steps - 1):
        torch.testing.assert_close(bank.states[k + 1], seen[k][0], rtol=1e-3, atol=1e-4)  # batch-size rounding
    with torch.no_grad():
        direct = family.denoise(family.denoiser, bank.states[1:2], bank.timesteps[1:2],
                                prompts.conditioning({"prompt_ids": torch.tensor([1]), **bank.extras(1)}),
                                bank.extras(1))
    torch.testing.assert_close(bank.cond[1:2], direct, rtol=1e-4, atol=1e-5)


def test_base_output_rows_come_on_the_training_device():
    """Every tensor of the prior rows is on the device the batch is (ids and SDXL's size ids too: a batch on CUDA
    concatenated with CPU ids fails on the first step)."""
    from dreambooth.base_prior import BasePrior
    bank = BasePrior(torch.zeros(3, 4, 2, 2), torch.arange(3), torch.ones(3, dtype=torch.long), torch.zeros(3, 4, 2, 2),
                     torch.zeros(3, 4, 2, 2), 2, seed=0,
                     extras=lambda n: {"original_sizes": torch.tensor([[16, 16]] * n),
                                       "target_sizes": torch.tensor([[16, 16]] * n)})
    rows = bank.rows(range(2), "meta", torch.float16)
    tensors = [*rows[:4], *rows[4].values()]
    assert all(t.device.type == "meta" for t in tensors) and rows[0].dtype == rows[3].dtype == torch.float16
    assert rows[2].shape == (4,) and rows[4]["target_sizes"].shape == (4, 2)


def test_base_output_rows_are_numbered_as_one_big_batch():
    """Which state a row takes depends on its place in the run only: 2 processes x 1 row, 1 process x 2 rows and 2
    accumulated micro-batches of 1 row take the same states, step after step, and each pass over the states is a
    permutation of all of them (a resumed run recomputes the same ones)."""
    from dreambooth.base_prior import BasePrior, positions
    one = [list(positions(s, 0, 1, 0, 1, 2, 2)) for s in range(3)]
    ddp = [[p for rank in (0, 1) for p in positions(s, 0, 1, rank, 2, 1, 1)] for s in range(3)]
    accumulated = [[p for micro in (0, 1) for p in positions(s, micro, 2, 0, 1, 1, 1)] for s in range(3)]
    assert one == ddp == accumulated == [[0, 1], [2, 3], [4, 5]]
    bank = BasePrior(torch.zeros(5, 1), torch.zeros(5), torch.zeros(5, dtype=torch.long), torch.zeros(5, 1), None,
                     None, seed=3, extras=lambda n: {})
    first = bank.indices(range(10))
    assert sorted(first[:5].tolist()) == sorted(first[5:].tolist()) == [0, 1, 2, 3, 4]
    assert first[:5].tolist() != first[5:].tolist()  # each pass its own order
    assert bank.indices(range(7, 9)).tolist() == first[7:9].tolist()  # found without replaying the ones before


def test_base_output_prompts_take_the_trigger_out_of_the_captions():
    from dreambooth.base_prior import prior_prompts
    assert prior_prompts(["a sks circle on a white background", "a sks circle", "a sks circle on a gray background"],
                         "a sks circle", "a circle") == [
        "a circle", "a circle on a white background", "a circle on a gray background"]
    assert prior_prompts(["sks dog on grass, sunny", "a photo of sks dog", "photo of a cat", "",
                          "sks, a dog in front of a house"], "a photo of sks dog", "a photo of dog") == [
        "a photo of dog", "dog on grass, sunny", "a dog in front of a house"]
    assert prior_prompts(["a photo of dog on grass"], "a photo of dog", "a photo of dog") == ["a photo of dog"]
    # a class prompt that is no part of the instance prompt: "a photo of sks" is no trigger to cut out of captions
    assert prior_prompts(["in front of a house", "a photo of sks dog in snow"], "a photo of sks dog", "dog") == [
        "dog", "dog in snow"]
    # pivotal tuning: its --token_abstraction words are the trigger
    assert prior_prompts(["TOK dog on grass", "a TOK"], "a photo of TOK dog", "a photo of dog", ["TOK"]) == [
        "a photo of dog", "dog on grass", "a"]


def test_sdxl_guides_from_zero_embeddings_for_the_empty_prompt():
    """SDXL's pipeline (force_zeros_for_empty_prompt) guides from all-zero text embeddings, not the encoded empty
    prompt: the prior's empty-prompt rows are zeros too; other rows are untouched."""
    from dreambooth.families import PromptEncoder
    family = _family("build_tiny_sdxl_pipeline")
    assert family.empty_prompt_is_zeros and not _family("build_tiny_pipeline").empty_prompt_is_zeros
    batch = {"prompt_ids": torch.tensor([0, 1]), "original_sizes": torch.tensor([[64, 64]] * 2),
             "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long), "target_sizes": torch.tensor([[64, 64]] * 2)}
    plain = PromptEncoder(family, ["a photo of dog", ""]).conditioning(batch)
    zeroed = PromptEncoder(family, ["a photo of dog", ""], zero_ids=(1,)).conditioning(batch)
    assert torch.equal(zeroed["encoder_hidden_states"][0], plain["encoder_hidden_states"][0])
    assert zeroed["encoder_hidden_states"][1].abs().max() == 0 < plain["encoder_hidden_states"][1].abs().max()
    assert zeroed["added_cond_kwargs"]["text_embeds"][1].abs().max() == 0


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
        "--prior_preservation_mode base_output needs --with_prior_preservation (and --class_prompt); to train "
        "without prior preservation, leave --prior_preservation_mode out (or set it to images)")
    assert fails("--caption_dropout_rate", "1") == "--caption_dropout_rate must be in [0, 1) (got 1.0)"
    assert fails("--use_ema", "--ema_decay", "1.5") == "--ema_decay must be in [0, 1) (got 1.5)"
    assert fails("--train_transformer_frac", "0.5") == (
        "--train_transformer_frac 0.5: after that share of the steps nothing would train; it is for runs that also "
        "train text encoders or new tokens (--train_text_encoder_ti, --train_text_encoder)")
    assert fails("--enable_npu_flash_attention") == (
        "--enable_npu_flash_attention is for Huawei Ascend NPUs, which this trainer does not run on; drop the flag "
        "(PyTorch SDPA attention is used)")


def test_class_image_flags_with_base_output(tiny_model, instance_dir, tmp_path):
    from dreambooth.config import parse_args, validate
    args = parse_args([str(a) for a in train_args(tiny_model["eps"], instance_dir, tmp_path / "o",
                                                  "--with_prior_preservation", "--class_prompt", "dog",
                                                  "--prior_preservation_mode", "base_output", "--num_class_images",
                                                  "50", "--class_generation_steps", "10", "--class_data_dir",
                                                  str(tmp_path / "cls"))])
    notes = []
    run = validate(args, warn=notes.append)
    assert notes == ["warning: --class_data_dir has no effect with --prior_preservation_mode base_output (it writes "
                     "no class images; its paths are sampled by the model being trained, in its training precision)"]
    assert (run.prior.num_class_images, run.prior.class_generation_steps) == (50, 10)  # its paths and their steps
    for mode, paths in (("base_output", 16), ("images", 100)):  # --num_class_images left out: each mode's default
        run = validate(parse_args([str(a) for a in train_args(tiny_model["eps"], instance_dir, tmp_path / "o",
                                                              "--with_prior_preservation", "--class_prompt", "dog",
                                                              "--prior_preservation_mode", mode)]), warn=print)
        assert run.prior.num_class_images == paths


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
    assert "the base model's own output as the target on 16 of its sampling paths (no class images)" in card
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


@pytest.mark.slow
def test_base_output_with_buckets_samples_paths_at_every_bucket_size(tiny_model, tmp_path, capsys):
    """--enable_bucket: each batch has one bucket's size, and its prior rows go through the same denoiser call, so
    the base's paths are sampled at every bucket size in use (SDXL: its size ids and zero empty-prompt embeddings)."""
    from conftest import draw_subject
    folder = tmp_path / "dog"
    folder.mkdir()
    for i, size in enumerate([(96, 64), (64, 96), (64, 64)]):
        draw_subject(folder / f"dog{i}.png", size=size, shift=i)
    out = tmp_path / "xl"
    assert train_dreambooth_lora.main([str(a) for a in train_args(
        tiny_model["xl"], folder, out, "--max_train_steps", "3", "--report_to", "none", "--with_prior_preservation",
        "--prior_preservation_mode", "base_output", "--class_prompt", "a photo of dog", "--num_class_images", "3",
        "--class_generation_steps", "2", "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "96",
        "--bucket_reso_steps", "32")]) == 0
    printed = capsys.readouterr().out
    assert "prior: the base's own output on 3 sampling paths (2 steps) of 1 prompt and the empty prompt " \
           "(guidance 5); no class images" in printed  # SDXL's pipeline default
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors") and not (out / "class_images").exists()


def test_base_output_refuses_paths_that_would_not_fit_in_memory():
    """The paths' states stay in memory for the run: a count past half of what the system has left is one line
    naming both flags, before any sampling; the default fits easily (16 x 25 SDXL latents at 1024 in bf16: 157 MiB)."""
    from dreambooth import base_prior
    from dreambooth.errors import UsageError
    need = base_prior.check_memory(16, 25, 3, (4, 128, 128), torch.bfloat16, available=8 * 2**30)
    assert need == 16 * 25 * 3 * 4 * 128 * 128 * 2
    with pytest.raises(UsageError) as e:
        base_prior.check_memory(1000, 50, 3, (16, 128, 128), torch.float32, available=8 * 2**30)
    assert str(e.value) == (
        "--num_class_images 1000 x --class_generation_steps 50: base_output's paths would hold 146.5 GiB of latents "
        "in memory, more than half of the 8.0 GiB available; lower --num_class_images (default 16) or "
        "--class_generation_steps")
    assert base_prior.available_memory() > 0
