"""One training step in process (no accelerator run, no subprocess) and the deferred reads between steps; only
the LoRA trains, in fp32 over half-precision frozen weights (dreambooth/models.add_lora, a target module the model
lacks is one line); the training peak memory counts the steps, not the setup before them."""
import os

import numpy as np
import pytest
import torch

from dreambooth import training
from dreambooth.errors import UsageError


class StepAccelerator:
    """The four things optimizer_step and StepReader ask of accelerate, on one process."""
    sync_gradients, scaler, num_processes = True, None, 1

    def __init__(self):
        self.logged = []

    def backward(self, loss):
        loss.backward()

    def clip_grad_norm_(self, parameters, max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)

    def log(self, values, step):
        self.logged.append((step, values))


@pytest.fixture(scope="module")
def family_and_prompts():
    from argparse import Namespace
    from dreambooth import models
    from dreambooth.families import PromptEncoder, StableDiffusion
    from make_tiny_model import build_tiny_pipeline
    family = StableDiffusion.from_pipeline(build_tiny_pipeline())
    family.freeze()
    models.add_lora(family.unet, family.text_encoders, Namespace(
        rank=4, lora_alpha=None, lora_dropout=0.0, use_dora=False, train_text_encoder=False,
        lora_target_modules="to_q,to_k,to_v,to_out.0"))
    return family, PromptEncoder(family, ["a photo of sks dog", "a photo of dog"])


def batch(pixels=True):
    images = torch.rand(2, 3, 64, 64) * 2 - 1 if pixels else torch.rand(2, 8, 32, 32)  # cached: mean and std
    return {"images": images, "prompt_ids": torch.tensor([0, 1]), "original_sizes": torch.tensor([[64, 64]] * 2),
            "crop_top_lefts": torch.zeros(2, 2, dtype=torch.long), "target_sizes": torch.tensor([[64, 64]] * 2)}


def test_one_step_trains_only_the_lora(family_and_prompts):
    family, prompts = family_and_prompts
    objective = family.objective(noise_offset=0.1, snr_gamma=5.0)
    lora = [p for p in family.unet.parameters() if p.requires_grad]
    frozen = {n: p.clone() for n, p in family.unet.named_parameters() if not p.requires_grad}
    before = [p.clone() for p in lora]
    optimizer = torch.optim.AdamW(lora, lr=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    torch.manual_seed(0)
    loss = training.training_loss(family, family.unet, objective, prompts, batch(), 0.5, device="cpu",
                                  weight_dtype=torch.float32, cached_latents=False, with_class_images=True)
    assert loss.shape == () and torch.isfinite(loss)
    norm = training.optimizer_step(StepAccelerator(), loss, lora, optimizer, schedule, max_grad_norm=1.0)
    assert torch.isfinite(norm) and norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(lora, before))
    assert all(torch.equal(p, frozen[n]) for n, p in family.unet.named_parameters() if n in frozen)
    # cached latents skip the VAE: the same call on the posterior's moments runs without it
    family.vae.encode = None  # a call would raise
    try:
        loss = training.training_loss(family, family.unet, objective, prompts, batch(pixels=False), 0.5, device="cpu",
                                      weight_dtype=torch.float32, cached_latents=True, with_class_images=False)
    finally:
        del family.vae.encode
    assert torch.isfinite(loss)


def test_cached_moments_give_the_same_latents_as_encoding_every_step(family_and_prompts):
    """--cache_latents keeps the posterior's mean and std, not one sample: with the same random state, a cached
    step draws exactly the latents an uncached step draws (bit for bit), and a fresh one at every step."""
    family, _ = family_and_prompts
    pixels = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        moments = family.latent_moments(pixels)
        assert moments.shape == (2, 8, 32, 32)
        torch.manual_seed(7)
        every_step = family.encode_images(pixels, torch.float32)
        torch.manual_seed(7)
        cached = family.sample_latents(moments, torch.float32)
        again = family.sample_latents(moments, torch.float32)
    assert torch.equal(every_step, cached)
    assert not torch.equal(cached, again)  # a new posterior sample each time, as without the cache
    mean = family.vae.encode(pixels).latent_dist.mean * family.vae.config.scaling_factor
    assert torch.allclose(cached, mean, atol=1.0) and not torch.equal(cached, mean)


def test_reads_are_deferred_and_a_bad_step_is_named():
    accelerator = StepAccelerator()

    def agree(acc, values, stop):
        return [float(v) for v in values], bool(stop)
    reader = training.StepReader(accelerator, logging_steps=4, agree=agree)
    for step, loss in enumerate([0.5, 0.4, 0.3], start=1):
        reader.add(training.PendingStep(step, 1e-4, torch.tensor(loss), torch.tensor(1.0)))
        assert not reader.due(step, must=False)  # nothing read back before step 4
    assert reader.due(3, must=True)  # a checkpoint (or the last step) forces the read
    assert reader.read(False) == (pytest.approx(0.3), 1e-4, False)
    assert [s for s, _ in accelerator.logged] == [1, 2, 3] and len(reader.history) == 3  # each under its own step
    reader.add(training.PendingStep(4, 1e-4, torch.tensor(0.2), torch.tensor(1.0)))
    reader.add(training.PendingStep(5, 1e-4, torch.tensor(float("nan")), torch.tensor(1.0)))
    with pytest.raises(training.NonFinite) as bad:
        reader.read(True)
    assert (bad.value.what, bad.value.step) == ("loss", 5)
    reader.pending = [training.PendingStep(6, 1e-4, torch.tensor(0.1), torch.tensor(float("inf")))]
    with pytest.raises(training.NonFinite) as bad:
        reader.read(False)
    assert (bad.value.what, bad.value.step) == ("gradient norm", 6)


def test_only_lora_trains_and_stays_fp32_over_half_precision_weights():
    from argparse import Namespace
    from dreambooth import models
    from make_tiny_model import build_tiny_pipeline
    from dreambooth.families import StableDiffusion
    pipe = build_tiny_pipeline()
    unet, te = pipe.unet, pipe.text_encoder
    StableDiffusion.from_pipeline(pipe).freeze()
    unet.to(dtype=torch.bfloat16)
    te.to(dtype=torch.bfloat16)
    args = Namespace(rank=4, lora_alpha=None, lora_dropout=0.0, use_dora=False, train_text_encoder=True,
                     lora_target_modules="to_q,to_k,to_v,to_out.0")
    models.add_lora(unet, [te], args)
    for model in (unet, te):
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("lora_" in n for n in trainable)
        assert all(p.dtype == torch.float32 for p in trainable.values())
        frozen = [p for n, p in model.named_parameters() if not p.requires_grad]
        assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert not any(p.requires_grad for p in pipe.vae.parameters())
    args.lora_target_modules = "to_q,not_a_module"
    with pytest.raises(UsageError, match="--lora_target_modules: no UNet2DConditionModel module named not_a_module; "
                                         "the default for this model is to_q,to_k,to_v,to_out.0"):
        models.add_lora(build_tiny_pipeline().unet, [], Namespace(**{**vars(args), "train_text_encoder": False}))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux only: restarting the peak-RSS counter")
def test_training_peak_memory_excludes_what_came_before():
    """The training peak is the true peak inside the steps (a backward pass frees its activations before the
    step ends, so sampling between steps would miss it), not a bigger one from setup (a model file mapped while
    loading); the process peak still includes that."""
    from dreambooth.report import RunStats, current_rss_mb
    stats = RunStats()
    stats.set(class_generation_seconds=0.0)
    big = np.ones(400 * 2**20 // 8)  # 400 MB during "setup"
    del big
    stats.mark_training_start()
    at_start = current_rss_mb()
    activations = np.ones(100 * 2**20 // 8)  # 100 MB inside a step, freed before it ends
    del activations
    stats.step_done()
    summary = stats.summary()
    assert at_start + 90 <= summary["train_peak_rss_mb"] <= at_start + 200
    assert summary["peak_rss_mb"] >= at_start + 350

