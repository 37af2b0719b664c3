"""Training objectives: how a clean latent is noised, what the denoiser must predict, and how much each example
counts. The model family picks its objective (families/base.py: `objective`); the loop only asks it to noise a
batch, hands the family's prediction back through `prediction`, and takes the weighted per-example MSE.

- DDPM (SD 1.x/2.x, SDXL): integer timesteps, `add_noise`, epsilon or v-prediction target, min-SNR-gamma weights,
  noise offset. Random numbers are drawn in the order diffusers' SD scripts draw them (noise, offset, timesteps),
  so a seeded run is the same run it was before this seam existed.
- Flow matching (SD 3, Flux): rectified flow as diffusers' SD3/Flux scripts train it: u from
  `compute_density_for_timestep_sampling` (--weighting_scheme), a timestep and sigma from the family's
  `FlowMatchEulerDiscreteScheduler` table, x_t = (1 - sigma) x0 + sigma noise, target noise - x0 (or x0 with
  --precondition_outputs), weights from `compute_loss_weighting_for_sd3`. diffusers' helpers, not our copies.
"""
from dataclasses import dataclass

import torch

WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")


@dataclass
class Noised:
    """One batch, noised: the denoiser's input and timesteps, what it must predict, per-example loss weights
    (None: all 1) and, for flow matching, each example's sigma (broadcastable over the latents)."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weights: torch.Tensor = None
    sigmas: torch.Tensor = None


class DDPMObjective:
    """Denoising diffusion (Ho et al.): epsilon or v-prediction, from the family's DDPM noise scheduler."""

    def __init__(self, scheduler, noise_offset=0.0, snr_gamma=None):
        self.scheduler, self.noise_offset, self.snr_gamma = scheduler, noise_offset, snr_gamma
        kind = scheduler.config.prediction_type
        if kind not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {kind}; use --prediction_type epsilon or v_prediction")

    def describe(self):
        return f"objective=ddpm prediction_type={self.scheduler.config.prediction_type}" + (
            f" snr_gamma={self.snr_gamma}" if self.snr_gamma else "") + (
            f" noise_offset={self.noise_offset}" if self.noise_offset else "")

    def noise(self, latents):
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise += self.noise_offset * torch.randn(latents.shape[:2] + (1, 1), device=latents.device,
                                                     dtype=latents.dtype)
        scheduler = self.scheduler
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        weights = self._snr_weights(timesteps) if self.snr_gamma else None
        return Noised(noisy, timesteps, target, weights)

    def at(self, noisy, timesteps, raw_target):
        """A Noised for given noisy latents and timesteps whose target is a denoiser's raw output there (the base
        model's, for base-output prior preservation); weighted as noise() weights its timesteps."""
        return Noised(noisy, timesteps, raw_target, self._snr_weights(timesteps) if self.snr_gamma else None)

    def _snr_weights(self, timesteps):
        """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
        from diffusers.training_utils import compute_snr
        snr = compute_snr(self.scheduler, timesteps)
        weights = torch.clamp(snr, max=self.snr_gamma)
        return weights / (snr + 1) if self.scheduler.config.prediction_type == "v_prediction" else weights / snr

    def prediction(self, model_output, noised):
        return model_output


class FlowMatchingObjective:
    """Rectified flow, as diffusers' SD3 and Flux DreamBooth scripts: timesteps drawn by --weighting_scheme from
    the scheduler's own table (its shift included, as the model was trained), velocity target."""

    def __init__(self, scheduler, weighting_scheme="logit_normal", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                 precondition_outputs=False):
        self.scheduler, self.weighting_scheme = scheduler, weighting_scheme
        self.logit_mean, self.logit_std, self.mode_scale = logit_mean, logit_std, mode_scale
        self.precondition_outputs = precondition_outputs

    def describe(self):
        return (f"objective=flow_matching weighting_scheme={self.weighting_scheme}"
                + (f" logit_mean={self.logit_mean} logit_std={self.logit_std}"
                   if self.weighting_scheme == "logit_normal" else "")
                + (f" mode_scale={self.mode_scale}" if self.weighting_scheme == "mode" else "")
                + (" precondition_outputs" if self.precondition_outputs else ""))

    def noise(self, latents):
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
        noise = torch.randn_like(latents)
        n = latents.shape[0]
        u = compute_density_for_timestep_sampling(self.weighting_scheme, n, logit_mean=self.logit_mean,
                                                  logit_std=self.logit_std, mode_scale=self.mode_scale)
        table = self.scheduler
        indices = (u * table.config.num_train_timesteps).long()
        timesteps = table.timesteps[indices].to(latents.device)
        # the sigma of each drawn timestep (diffusers' get_sigmas looks each one up; the index is the same row)
        sigmas = table.sigmas[indices].to(latents.device, latents.dtype).reshape(n, *[1] * (latents.dim() - 1))
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        target = latents if self.precondition_outputs else noise - latents
        weights = compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).float().reshape(n)
        return Noised(noisy, timesteps, target, weights, sigmas)

    def at(self, noisy, timesteps, raw_target):
        """A Noised for given noisy latents and timesteps whose target is a denoiser's raw output there (the base
        model's velocity, for base-output prior preservation), turned into this objective's target and weighted
        as noise() weights its sigmas (the scheduler's timesteps are its sigmas x num_train_timesteps)."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3
        n = noisy.shape[0]
        sigmas = (timesteps.float() / self.scheduler.config.num_train_timesteps).to(noisy.dtype).reshape(
            n, *[1] * (noisy.dim() - 1))
        noised = Noised(noisy, timesteps, None, compute_loss_weighting_for_sd3(self.weighting_scheme, sigmas).float()
                        .reshape(n), sigmas)
        noised.target = self.prediction(raw_target, noised)
        return noised

    def prediction(self, model_output, noised):
        """--precondition_outputs (EDM-style, as diffusers): the model's velocity turned into a clean-latent
        estimate, x0 = x_t - sigma v, scored against x0."""
        if self.precondition_outputs:
            return model_output * (-noised.sigmas) + noised.noisy
        return model_output
