"""One training step, and what happens between steps.

`training_loss` is the DreamBooth loss for one batch (callable in process, no accelerator needed): what noising
and target mean belongs to the family's objective (objectives.py), the denoiser call to the family;
`optimizer_step` the update. `StepReader` owns the deferred loss reads: losses stay on the device and are
read back every --logging_steps steps, before a checkpoint, a validation, the last step or a stop — each
read is a CPU-GPU sync point, so nothing else in the loop reads a tensor.
"""
import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def prior_preservation_loss(per_example_loss, num_instance, prior_loss_weight):
    """Instance loss + prior_loss_weight x class loss; the batch is [instance..., class...]."""
    if per_example_loss.shape[0] == num_instance:
        return per_example_loss.mean()
    instance, prior = per_example_loss[:num_instance], per_example_loss[num_instance:]
    return instance.mean() + prior_loss_weight * prior.mean()


def _unwrapped(model):
    return getattr(model, "module", model)  # DDP keeps the model as .module


@contextlib.contextmanager
def adapters_off(models):
    """The base model: every LoRA adapter of these (denoiser, trained text encoders) disabled for the block."""
    models = [_unwrapped(m) for m in models if getattr(_unwrapped(m), "peft_config", None)]
    for model in models:
        model.disable_adapters()
    try:
        yield
    finally:
        for model in models:
            model.enable_adapters()


def training_loss(family, denoiser, objective, prompts, batch, prior_loss_weight, *, device, weight_dtype,
                  cached_latents, with_class_images, prior_rows=None):
    """The same for every family: latents (a fresh posterior sample; from the cache or the VAE), noised by the
    family's objective, the family's denoiser call (its conditioning, packing, ids and timestep scaling stay
    inside the family), then the weighted per-example MSE and the prior split.
    batch["images"] are pixels, or the VAE posterior's moments when they were cached.

    prior_rows (--prior_preservation_mode base_output; base_prior.BasePrior.rows): no class images; states of the
    base's own class-prompt sampling paths, with the base's predictions there as targets, appended as the prior
    rows (one denoiser call for all rows: DDP allows one forward per backward)."""
    with torch.no_grad():
        if cached_latents:  # the VAE posterior's mean and std, encoded once: a fresh sample is still drawn here
            latents = family.sample_latents(batch["images"].to(device), weight_dtype)
        else:  # a VAE encode every step: what --cache_latents saves
            latents = family.encode_images(batch["images"], weight_dtype)
    noised = objective.noise(latents)
    if prior_rows is not None:
        noisy, timesteps, prompt_ids, raw, extras = prior_rows
        prior = objective.at(noisy, timesteps.to(noised.timesteps.dtype), raw)
        batch = {k: torch.cat([v, extras[k] if k in extras else prompt_ids]) for k, v in batch.items()
                 if k != "images"}  # BasePrior.rows put them on the batch's device
        weights = None if noised.weights is None else torch.cat([noised.weights, prior.weights])
        noised = type(noised)(torch.cat([noised.noisy, noisy.to(noised.noisy.dtype)]),
                              torch.cat([noised.timesteps, prior.timesteps]),
                              torch.cat([noised.target, prior.target.to(noised.target.dtype)]), weights,
                              None if noised.sigmas is None else torch.cat([noised.sigmas, prior.sigmas]))
    model_output = family.denoise(denoiser, noised.noisy, noised.timesteps, prompts.conditioning(batch), batch)
    prediction = objective.prediction(model_output, noised)
    per_example = F.mse_loss(prediction.float(), noised.target.float(), reduction="none").mean(
        dim=tuple(range(1, prediction.dim())))
    if noised.weights is not None:
        per_example = per_example * noised.weights
    num_instance = latents.shape[0] if prior_rows is not None else \
        noised.noisy.shape[0] // (2 if with_class_images else 1)
    return prior_preservation_loss(per_example, num_instance, prior_loss_weight)


def optimizer_step(accelerator, loss, parameters, optimizer, lr_scheduler, max_grad_norm, drop_grads=()):
    """Backward, clip (on the last micro-batch of an accumulation window), update. Returns the gradient norm
    (a device tensor: not read here) or None inside an accumulation window. drop_grads: parameters whose share
    of the run is over (--train_text_encoder_ti_frac): their gradients go before clipping, and every optimizer
    here skips a parameter without one (no update, no weight decay)."""
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        for p in drop_grads:
            p.grad = None
    grad_norm = accelerator.clip_grad_norm_(parameters, max_grad_norm) if accelerator.sync_gradients else None
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


@dataclass
class PendingStep:
    """An optimizer step whose loss and gradient norm are still on the device."""
    step: int
    lr: float
    loss: torch.Tensor
    grad_norm: torch.Tensor


class NonFinite(Exception):
    """A NaN/inf loss or gradient norm, found at a read: (what, value, step)."""

    def __init__(self, what, value, step):
        super().__init__(what, value, step)
        self.what, self.value, self.step = what, value, step


class StepReader:
    """Deferred reads of the loop's losses. `add` keeps a step's tensors; `read` makes the one host sync (agreed
    across processes, with the stop flag), checks every pending step, logs them to the trackers under their own
    step numbers and returns whether to stop. A checkpoint is saved only after its steps were read as finite."""

    def __init__(self, accelerator, logging_steps, agree):
        self.accelerator, self.logging_steps, self.agree = accelerator, logging_steps, agree
        self.pending, self.history = [], []  # history: (step, loss) read so far, for loss.png

    def add(self, pending):
        self.pending.append(pending)

    def due(self, step, must):
        """Read now? Every logging_steps steps, or when something that must not run on unread losses follows."""
        return bool(self.pending) and (step % self.logging_steps == 0 or must)

    def read(self, stop_requested):
        """(last loss, last lr, stop agreed). Raises NonFinite for the first bad step."""
        values, stop = self.agree(self.accelerator, [v for p in self.pending for v in (p.loss, p.grad_norm)],
                                  stop_requested)
        for p, loss, norm in zip(self.pending, values[::2], values[1::2]):
            if not math.isfinite(loss):
                raise NonFinite("loss", loss, p.step)
            if not math.isfinite(norm) and self.accelerator.scaler is None:  # fp16's scaler skips those steps
                raise NonFinite("gradient norm", norm, p.step)
            self.accelerator.log({"loss": loss, "lr": p.lr}, step=p.step)
            self.history.append((p.step, loss))
        last_lr = self.pending[-1].lr
        self.pending = []
        return self.history[-1][1], last_lr, stop
