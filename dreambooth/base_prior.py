"""Prior preservation from the base model's own output, on the base's own sampling paths
(--prior_preservation_mode base_output).

Image-based prior preservation regresses the class prompt onto the noise of ~100-200 generated class images: the
LoRA is pulled toward those few images (and their decode/encode round trip), not held where the base was (on the
toy world, 50 class images left "a circle" with another colour or background on 0.66 of the seeds; this, 0.33:
docs/quality.md). Here nothing is decoded or written. Before training, the base (every LoRA off) samples
--num_class_images paths of the class prompt (and of the captions without the trigger) with its own sampler and
its pipeline's classifier-free guidance, as it draws class images; every state x_t on those paths is kept with the
base's predictions there: under the path's prompt and, where the family samples with classifier-free guidance,
under the empty prompt. A training step adds prior
rows drawn from those states, whose targets are those predictions, so the LoRA learns to leave the denoiser
unchanged exactly where sampling "a dog" goes, the unconditional branch that guidance extrapolates from included.

Cost: num_paths x steps base forwards (x2 with guidance) once, in batches of --sample_batch_size, and no VAE decode
or file; then 1-2 extra rows per instance row each step, in the same denoiser call (the targets are stored). The
states live on the CPU in the training precision: num_paths x steps x (1 + 2) latents (16 paths x 25 steps at 1024
in bf16: SDXL ~160 MB, Flux.1 ~400 MB).

Which state a row takes depends only on its place in the run (step, micro-batch, process, row), so gradient
accumulation and several processes see the same rows as one big batch, and a resumed run the same rows as an
uninterrupted one (the states are recomputed from the seed at start)."""
import math
import os
import re

import torch


class BasePrior:
    """The states of the base's class-prompt sampling paths and its predictions there.

    states [N, C, h, w], timesteps [N], prompt_ids [N] (the prompt each state's path sampled), cond [N, C, h, w]
    (the base's raw output under that prompt), uncond (under the empty prompt; None: not kept), on the CPU."""

    def __init__(self, states, timesteps, prompt_ids, cond, uncond, uncond_id, seed, extras):
        self.states, self.timesteps, self.prompt_ids, self.cond = states, timesteps, prompt_ids, cond
        self.uncond, self.uncond_id, self.seed = uncond, uncond_id, seed or 0
        self.extras = extras  # n -> the per-row conditioning keys besides the prompt (SDXL's size and crop ids)

    def __len__(self):
        return self.states.shape[0]

    def order(self, cycle):
        """The cycle-th pass over the states: a permutation seeded by (seed, cycle), so any position is found
        without replaying the ones before it."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + cycle)
        return torch.randperm(len(self), generator=g)

    def indices(self, positions):
        """The state for each global row position (see rows)."""
        n, out, orders = len(self), [], {}
        for p in positions:
            cycle = p // n
            if cycle not in orders:
                orders[cycle] = self.order(cycle)
            out.append(int(orders[cycle][p % n]))
        return torch.tensor(out, dtype=torch.long)

    def rows(self, positions, device, dtype):
        """(noisy [R, ...], timesteps [R], prompt ids [R], raw targets [R, ...], {batch key: [R, ...]}) for the
        prior rows of the given global positions: each position gives its state under its path's prompt, then (where
        kept) the same state under the empty prompt."""
        idx = self.indices(positions)
        noisy, timesteps, ids, targets = [self.states[idx]], [self.timesteps[idx]], [self.prompt_ids[idx]], \
            [self.cond[idx]]
        if self.uncond is not None:
            noisy.append(self.states[idx])
            timesteps.append(self.timesteps[idx])
            ids.append(torch.full((len(idx),), self.uncond_id, dtype=torch.long))
            targets.append(self.uncond[idx])
        ids = torch.cat(ids)
        return (torch.cat(noisy).to(device, dtype), torch.cat(timesteps).to(device), ids.to(device),
                torch.cat(targets).to(device, dtype), {k: v.to(device) for k, v in self.extras(len(ids)).items()})


def positions(step, micro, accumulation, process, processes, batch_size, rows):
    """The global positions of a micro-batch's rows: numbered as one big batch of the whole run would number them
    (optimizer step, micro-batch of the accumulation window, process, row), so 2 processes x 1 row, 1 process x 2
    rows and 2 accumulated micro-batches of 1 row take the same states, and a resumed run the ones it would have."""
    first = ((step * accumulation + micro) * processes + process) * batch_size
    return range(first, first + rows)


def prior_prompts(captions, instance_prompt, class_prompt, triggers=None):
    """The prompts the base's paths are sampled under: --class_prompt, then each training caption with the trigger
    taken out, so the words the captions add (the setting, the background) are held where the base had them too:
    the instance prompt inside a caption is replaced by the class prompt, or else the trigger words are removed
    ("a photo of sks dog on the beach" -> "a photo of dog on the beach"). triggers: the words that name the subject
    (pivotal tuning: --token_abstraction's); by default the instance prompt's words the class prompt lacks, used for
    removal only when that is one word (with --class_prompt "dog" and --instance_prompt "a photo of sks dog" it would
    be "a photo of sks", and removing those would mangle captions). A caption without the trigger is no class prompt
    (it is what the subject's photos are called) and is left out."""
    if triggers is None:
        class_words = set(class_prompt.split())
        triggers = [w for w in instance_prompt.split() if w not in class_words]
        if not triggers:  # nothing names the subject apart from the class: every caption is the subject's
            return [class_prompt]
        if len(triggers) > 1:
            triggers = []  # only the whole instance prompt is replaced
    out = [class_prompt]
    pattern = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(w) for w in triggers) + r")(?!\w)") if triggers else None
    for caption in captions:
        if instance_prompt and instance_prompt in caption:
            prompt = caption.replace(instance_prompt, class_prompt)
        elif pattern is not None and pattern.search(caption):
            prompt = re.sub(r"\s+([,.;:!?])", r"\1", " ".join(pattern.sub(" ", caption).split())).strip(" ,;:")
        else:
            continue
        if prompt and prompt not in out:
            out.append(prompt)
    return out


def available_memory():
    """Bytes of memory the system can still give (MemAvailable: free plus reclaimable cache), or None unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(num_paths, steps, tensors_per_state, latent_shape, dtype, available=None, local_processes=1):
    """The paths' states and targets live in memory for the whole run, one copy per process: refuse, in one line
    before sampling, a count that would take more than half of what the machine has left (the run needs the rest)."""
    need = num_paths * steps * tensors_per_state * math.prod(latent_shape) * torch.empty((), dtype=dtype).element_size()
    need *= local_processes
    have = available_memory() if available is None else available
    if have is not None and need > have / 2:
        from .errors import UsageError
        raise UsageError(f"--num_class_images {num_paths} x --class_generation_steps {steps}: base_output's paths "
                         f"would hold {need / 2**30:.1f} GiB of latents in memory, more than half of the "
                         f"{have / 2**30:.1f} GiB available; lower --num_class_images (default 16) or "
                         "--class_generation_steps")
    return need


def guidance_scale(family):
    """The classifier-free guidance scale the family's pipeline samples with when none is given: what its class
    images are drawn with (SD 7.5, SDXL 5.0, SD 3 7.0)."""
    import inspect
    return inspect.signature(family.pipeline_class().__call__).parameters["guidance_scale"].default


def sampling_scheduler(family, steps, latent_shape):
    """The family's own sampler (as its class images and validation use it), set to `steps` steps; with Flux's
    resolution-dependent shift, its sigmas and mu as FluxPipeline passes them."""
    scheduler = family.sampling_scheduler(family.noise_scheduler.config)
    c = scheduler.config
    if c.get("use_dynamic_shifting", False):
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift
        seq_len = (latent_shape[-2] // 2) * (latent_shape[-1] // 2)
        mu = calculate_shift(seq_len, c.get("base_image_seq_len", 256), c.get("max_image_seq_len", 4096),
                             c.get("base_shift", 0.5), c.get("max_shift", 1.15))
        sigmas = None if c.get("use_flow_sigmas", False) else np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(steps if sigmas is None else None, sigmas=sigmas, mu=mu)
    else:
        scheduler.set_timesteps(steps)
    return scheduler


@torch.no_grad()
def sample_paths(family, denoiser, prompts, class_ids, uncond_id, *, num_paths, steps, guidance,
                 latent_shape, batch_extras, batch_size, seed, device, dtype, first_path=0):
    """Run the base's sampler on num_paths paths (path i under class_ids[i % len], each from its own seeded noise,
    so the same paths whatever the batching) and keep every state with the base's predictions. uncond_id None: no
    classifier-free guidance (Flux.1, guidance-distilled or schnell). batch_extras(n): the per-row conditioning
    keys the family reads besides the prompt (SDXL's size and crop ids)."""
    states, timesteps, state_ids, cond_out, uncond_out = [], [], [], [], []
    for start in range(0, num_paths, batch_size):
        chunk = range(start, min(start + batch_size, num_paths))
        n = len(chunk)
        scheduler = sampling_scheduler(family, steps, latent_shape)
        x = torch.cat([torch.randn((1, *latent_shape),
                                   generator=torch.Generator().manual_seed(seed * 100003 + first_path + i))
                       for i in chunk]).to(device, dtype) * getattr(scheduler, "init_noise_sigma", 1.0)
        ids = [class_ids[(first_path + i) % len(class_ids)] for i in chunk]
        ids = torch.tensor(ids + ([uncond_id] * n if uncond_id is not None else []))
        batch = dict(batch_extras(len(ids)), prompt_ids=ids)
        conditioning = prompts.conditioning(batch)
        copies = len(ids) // n
        for t in scheduler.timesteps:
            # what the denoiser is given: the sampler's scaled input (Euler-type DDPM samplers), else x itself
            model_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            t_rows = torch.full((len(ids),), float(t), device=device)
            if not torch.is_floating_point(scheduler.timesteps):
                t_rows = t_rows.long()
            out = family.denoise(denoiser, model_in.repeat(copies, *[1] * (x.dim() - 1)), t_rows, conditioning,
                                 batch)
            cond = out[:n]
            states.append(model_in.cpu())
            timesteps.append(t_rows[:n].cpu())
            state_ids.append(ids[:n])
            cond_out.append(cond.cpu())
            if uncond_id is not None:
                uncond = out[n:]
                uncond_out.append(uncond.cpu())
                guided = uncond + guidance * (cond - uncond)
            else:
                guided = cond
            x = scheduler.step(guided, t, x, return_dict=False)[0]
    return BasePrior(torch.cat(states), torch.cat(timesteps), torch.cat(state_ids), torch.cat(cond_out),
                     torch.cat(uncond_out) if uncond_id is not None else None, uncond_id, seed, batch_extras)


class BasePriors:
    """One BasePrior per latent size the run trains at (one without --enable_bucket; one per bucket in use), so a
    batch's prior rows have its own size and go through the same denoiser call."""

    def __init__(self, banks):
        self.banks = banks  # {(h, w) in pixels: BasePrior}

    def rows(self, positions, size, device, dtype):
        return self.banks[tuple(size)].rows(positions, device, dtype)
