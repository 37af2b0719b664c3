"""The training objectives behind the family seam: DDPM (SD 1.x/2.x, SDXL) losses pinned bit for bit to what the
loop computed before the seam existed, and flow matching (SD 3, Flux) checked against diffusers' own formulas; the prior-preservation split of the
loss, epsilon and v-prediction targets and the min-SNR weights."""
from argparse import Namespace

import pytest
import torch

from dreambooth import models, training
from dreambooth.objectives import DDPMObjective, FlowMatchingObjective

# loss.item().hex() of one training_loss call, measured with the pre-seam training.py (commit 53e4a30) on this
# batch, seed and tiny model, each family's training scheduler being DDPM as `load` makes it (the tiny SDXL
# pipeline samples with Euler); the seam must not move them by one bit
PINNED = {"sd_eps/plain": "0x1.2591c80000000p+0", "sd_eps/offset_snr_prior": "0x1.bb7c640000000p+0",
          "sd_v/plain": "0x1.3006900000000p-2", "sd_v/offset_snr_prior": "0x1.144d8c0000000p-5",
          "sdxl/plain": "0x1.2e3bd20000000p+0", "sdxl/offset_snr_prior": "0x1.d38d800000000p+0"}


def _batch(size):
    g = torch.Generator().manual_seed(3)
    return {"images": torch.rand(2, 3, size, size, generator=g) * 2 - 1, "prompt_ids": torch.tensor([0, 1]),
            "original_sizes": torch.tensor([[size, size]] * 2), "crop_top_lefts": torch.tensor([[0, 0], [4, 2]]),
            "target_sizes": torch.tensor([[size, size]] * 2)}


def _lora_family(family):
    family.freeze()
    models.add_lora(family.denoiser, family.text_encoders, Namespace(
        rank=4, lora_alpha=None, lora_dropout=0.0, use_dora=False, train_text_encoder=False,
        lora_target_modules=family.default_lora_targets))
    return family


@pytest.mark.parametrize("name", ["sd_eps", "sd_v", "sdxl"])
def test_ddpm_losses_are_pinned_bit_identical(name):
    from dreambooth.families import PromptEncoder, StableDiffusion, StableDiffusionXL
    from make_tiny_model import build_tiny_pipeline, build_tiny_sdxl_pipeline
    pipe = {"sd_eps": build_tiny_pipeline, "sd_v": lambda: build_tiny_pipeline("v_prediction"),
            "sdxl": build_tiny_sdxl_pipeline}[name]()
    family = _lora_family((StableDiffusionXL if name == "sdxl" else StableDiffusion).from_pipeline(pipe))
    prompts = PromptEncoder(family, ["a photo of sks dog", "a photo of dog"])
    for label, (offset, gamma, weight, with_class) in {"plain": (0.0, None, 1.0, False),
                                                       "offset_snr_prior": (0.1, 5.0, 0.5, True)}.items():
        torch.manual_seed(0)
        loss = training.training_loss(family, family.denoiser, family.objective(offset, gamma), prompts, _batch(64),
                                      weight, device="cpu", weight_dtype=torch.float32, cached_latents=False,
                                      with_class_images=with_class)
        assert loss.item().hex() == PINNED[f"{name}/{label}"], label


class _Table:
    """A FlowMatchEulerDiscreteScheduler as training reads it."""

    def __init__(self, shift=3.0):
        from diffusers import FlowMatchEulerDiscreteScheduler
        self.scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)


@pytest.mark.parametrize("scheme", ["logit_normal", "sigma_sqrt", "mode", "cosmap", "none"])
@pytest.mark.parametrize("precondition", [False, True])
def test_flow_matching_follows_diffusers_sd3_script(scheme, precondition):
    """The noisy input, target and weights are diffusers' train_dreambooth_lora_sd3.py formulas, with the same
    random numbers drawn in the same order (noise, then u)."""
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
    scheduler = _Table().scheduler
    objective = FlowMatchingObjective(scheduler, scheme, 0.0, 1.0, 1.29, precondition)
    latents = torch.randn(3, 16, 4, 4)
    torch.manual_seed(5)
    noised = objective.noise(latents)
    torch.manual_seed(5)  # the script's own steps, written out
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(scheme, 3, logit_mean=0.0, logit_std=1.0, mode_scale=1.29)
    indices = (u * scheduler.config.num_train_timesteps).long()
    timesteps = scheduler.timesteps[indices]
    sigmas = torch.stack([scheduler.sigmas[(scheduler.timesteps == t).nonzero().item()] for t in timesteps])
    sigmas = sigmas.reshape(3, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise
    assert torch.equal(noised.timesteps, timesteps) and torch.equal(noised.noisy, noisy)
    assert torch.equal(noised.target, latents if precondition else noise - latents)
    assert torch.allclose(noised.weights, compute_loss_weighting_for_sd3(scheme, sigmas).reshape(3))
    output = torch.randn_like(latents)
    expected = output * (-sigmas) + noisy if precondition else output
    assert torch.equal(objective.prediction(output, noised), expected)
    assert 0 < float(noised.sigmas.min()) and float(noised.sigmas.max()) <= 1


def test_ddpm_objective_refuses_an_unknown_prediction_type():
    from diffusers import DDPMScheduler
    with pytest.raises(ValueError, match="unsupported prediction_type sample"):
        DDPMObjective(DDPMScheduler(prediction_type="sample"))


def test_prior_preservation_loss_and_targets():
    from diffusers import DDPMScheduler
    from dreambooth.objectives import DDPMObjective
    from dreambooth.training import prior_preservation_loss
    per = torch.tensor([1.0, 3.0, 10.0, 20.0])
    assert prior_preservation_loss(per, 2, 0.5).item() == pytest.approx(2.0 + 0.5 * 15.0)
    assert prior_preservation_loss(per, 4, 0.5).item() == pytest.approx(per.mean().item())
    latents = torch.randn(2, 4, 8, 8)
    eps = DDPMScheduler(prediction_type="epsilon")
    v = DDPMScheduler(prediction_type="v_prediction")
    torch.manual_seed(0)
    noised = DDPMObjective(eps).noise(latents)
    torch.manual_seed(0)
    noise, t = torch.randn_like(latents), torch.randint(0, 1000, (2,))
    assert torch.equal(noised.timesteps, t) and torch.equal(noised.target, noise) and noised.weights is None
    assert torch.equal(noised.noisy, eps.add_noise(latents, noise, t))
    torch.manual_seed(0)
    noised = DDPMObjective(v).noise(latents)
    alpha = v.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - v.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.target, alpha * noise - sigma * latents)
    t = torch.tensor([10, 900])
    w = DDPMObjective(eps, snr_gamma=5.0)._snr_weights(t)
    assert w[0] < 1 and w[1] == pytest.approx(1.0)  # high-SNR (small t) is down-weighted, low-SNR untouched

