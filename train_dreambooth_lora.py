#!/usr/bin/env python
"""DreamBooth LoRA training for Stable Diffusion 1.x / 2.x, SDXL, SD 3 / 3.5 and Flux.1.

    accelerate launch train_dreambooth_lora.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \
      --with_prior_preservation --class_prompt "a photo of dog" --output_dir work_dirs/sd15_dog

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora.py (and _sdxl.py). Reading order: the
flags are checked (no model loaded yet), then `DreamBoothRecipe` sets up in named steps (accelerator ->
model -> class priors -> LoRA -> data -> optimizer and schedule -> resume), `train()` runs the loop and
`save_outputs()` writes pytorch_lora_weights.safetensors, which `pipe.load_lora_weights(output_dir)` loads
as is. What differs between model families (SDXL's second text encoder, pooled embeddings, time ids) is in
dreambooth/families/: the loop never sees it.
"""
import os
import sys
import time

from dreambooth import __version__
from dreambooth.config import parse_args, validate
from dreambooth.errors import run_cli
from dreambooth.files import check_free_space

PROG = "train_dreambooth_lora.py"


def log_main(message):
    """Before accelerate starts we only know our rank from the launcher's environment."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def main(argv=None):
    """Exit codes: 0 done, 2 bad input (one line), 3 non-finite loss, 4 trained but the Hub upload failed,
    128+N stopped by signal N, 1 a bug."""
    return run_cli(PROG, _main, argv)


def _main(argv):
    from dreambooth.checkpoints import term_when_parent_dies
    term_when_parent_dies()  # first: a SIGTERM to a one-process `accelerate launch` must reach us, even now
    from dreambooth import resident
    resident.map_large_allocations()  # before anything big is allocated: freed tensors' memory goes back
    from dreambooth.report import RunStats
    stats = RunStats()
    args = parse_args(argv)
    from dreambooth.outputs import FolderLock
    from dreambooth.run_config import RunRecord
    with FolderLock(args.output_dir, main_process=os.environ.get("RANK", "0") == "0"):  # one run per folder
        run = validate(args, warn=log_main)  # the flags' last use: from here on, the typed settings
        record = RunRecord()
        if run.hub.push_to_hub and os.environ.get("RANK", "0") == "0":  # as diffusers: the repo exists before training
            from dreambooth.hub import prepare_repo
            record.hub_repo_id = prepare_repo(run.hub.hub_model_id, run.outputs.output_dir, run.hub.hub_token)
        return train(run, record, stats)


def train(run, record, stats):
    """Set up, train and write the outputs of one checked run (run_config.RunConfig); returns the exit code."""
    recipe = DreamBoothRecipe(run, record, stats)
    try:
        recipe.setup()
        code = recipe.train()
        return recipe.finish() if code == 0 else code
    except OSError as e:  # the output folder turned read-only or full mid-run: one line, and where to resume
        recipe.cleanup()
        from dreambooth import checkpoints
        from dreambooth.errors import UsageError, os_error_line
        line = os_error_line(e)
        if line is None:
            raise
        good = checkpoints.latest_good(run.outputs.output_dir)
        if good and checkpoints.checkpoint_step(good) == getattr(recipe, "max_train_steps", None):
            line += (f"; the trained weights are safe in {good} (its {checkpoints.LORA_WEIGHT_NAME} loads as the final "
                     "file would)")
        elif good:
            line += f" with --resume_from_checkpoint {good}"
        raise UsageError(line) from e
    except BaseException:
        recipe.cleanup()
        raise


class DreamBoothRecipe:
    """One run. setup() in named steps, each given only its own settings group(s); train() the loop; finish() the
    outputs. `run` is the checked, typed settings (never changed); `record` what the run decides as it goes."""

    def __init__(self, run, record, stats):
        self.run, self.record, self.stats = run, record, stats
        self.instance_images = list(run.instance_images)
        self.accelerator = None
        self.started_at = time.time()  # unix time, for the kohya file's ss_training_started_at

    # ---- setup ----------------------------------------------------------------------------------------------
    def setup(self):
        run = self.run
        from dreambooth.quiet import quiet_libraries
        quiet_libraries()  # before the imports below: some notices are printed at import time
        import torch
        from dreambooth import families, models, report
        import diffusers  # noqa: F401  (imported lazily by the libraries: load it now, so the baseline below
        import transformers  # noqa: F401  is the runtime's own memory and everything above it the run's)
        self.stats.baseline_rss_mb = report.current_rss_mb()
        self.torch = torch

        # SDXL reads text encoder 1's penultimate layer: LoRA on its last layer gets no gradient, which DDP must know
        unused = bool(run.lora.train_text_encoder and run.family.unused_text_encoder_layers)
        self._setup_accelerator(run.training, run.outputs.output_dir, run.validation, unused)
        self.family = self._setup_model(families.ModelSource.from_flags(run.model), run.memory, run.lora,
                                        run.data.resolution, run.data.bucket_reso_steps if run.data.enable_bucket
                                        else None)
        self.objective = self.family.objective(run.training.noise_offset, run.training.snr_gamma)
        self.accelerator.print(f"{self.objective.describe()} scheduler={type(self.family.noise_scheduler).__name__} "
                          f"{self.family.denoiser_name}_params={sum(p.numel() for p in self.family.denoiser.parameters())}")
        # image-based prior preservation generates class images now; base_output needs none (its targets are the
        # base model's own outputs on its sampling paths, computed in _setup_data)
        self.class_images = self._setup_class_priors(run.prior, run.model, run.memory, run.data.resolution,
                                                     run.training.seed, run.outputs.output_dir) \
            if run.prior.class_images else []
        self._setup_lora(models.LoraSettings.from_flags(run.lora), run.lora, run.training)
        self._setup_data(run.data, run.prior, run.memory, run.validation.validation_prompt, run.training.seed,
                         run.training.train_batch_size)
        self._setup_optimizer(run.optimizer, run.lora, run.training)
        self._setup_schedule(run.training, run.optimizer, run.outputs)
        self._setup_resume(run.outputs, run.optimizer.ema_decay)

    def _setup_accelerator(self, training, output_dir, logging, find_unused_parameters=False):
        """Devices, mixed precision, accumulation, trackers: accelerate's job. training: the loop's group;
        logging: the trackers' (validation and logging)."""
        import datetime
        from accelerate import Accelerator
        from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs,
                                      ProjectConfiguration, set_seed)
        from dreambooth import report
        torch = self.torch
        trackers = report.available_trackers(logging.report_to, warn=log_main)
        # torchrun on a machine without GPUs: accelerate only picks gloo multi-CPU when told it is on CPU.
        cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
        self.accelerator = Accelerator(
            cpu=cpu_ddp, gradient_accumulation_steps=training.gradient_accumulation_steps,
            mixed_precision=training.mixed_precision, log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=output_dir,
                                                logging_dir=os.path.join(output_dir, logging.logging_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=training.ddp_timeout)),
                             DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)])
        if training.seed is not None:
            set_seed(training.seed)
        if training.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        self.record.mixed_precision = self.accelerator.mixed_precision  # what ran, for config.yaml and the card
        self.weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.accelerator.mixed_precision,
                                                                                torch.float32)
        check_free_space(output_dir, 50 * 2**20, "LoRA weights and checkpoints")

    def _setup_model(self, source, memory, lora, resolution, bucket_steps):
        """The base model, frozen, in the weight dtype (the denoiser, and the text encoders that do not train, in
        4 or 8 bits when asked), given its family's own flags; everything checked that needs it, before any
        output. memory: the quantization group; lora: which encoders train (they are never quantized)."""
        from dreambooth import models
        run, accelerator = self.run, self.accelerator
        family_class, family_options, quantization = run.family, dict(run.family_options), run.quantization
        training = run.training
        accelerator.print(
            f"dreambooth-lora {__version__} | model={source.path} family={family_class.name} "
            f"images={len(self.instance_images)} "
            f"prior={self._prior_text()} "
            f"res={resolution} batch={training.train_batch_size}x{training.gradient_accumulation_steps}x"
            f"{accelerator.num_processes} lr={run.optimizer.learning_rate} rank={lora.rank} "
            f"text_encoder={'lora' if lora.train_text_encoder else 'frozen'} "
            f"precision={accelerator.mixed_precision} device={accelerator.device} out={run.outputs.output_dir}")
        # the encoders nothing trains: no LoRA from --train_text_encoder, no new rows from pivotal tuning
        rows = set(family_class.pivotal_text_encoders(family_options)) if lora.train_text_encoder_ti else set()
        frozen_encoders = [n for i, (n, t) in enumerate(zip(family_class.text_encoder_names,
                                                            family_class.text_encoder_lora_targets))
                           if not (lora.train_text_encoder and t) and i not in rows] \
            if memory.quantize_text_encoders else []
        family = family_class.load(source, self.weight_dtype, quantization, accelerator.device,
                                   frozen_encoders).configure(**family_options)
        self.stats.phase("load")
        if quantization:
            from dreambooth import quantize
            quantized = [n for n in [family.denoiser_name, *family.text_encoder_names]
                         if quantize.is_quantized(getattr(family, "denoiser") if n == family.denoiser_name
                                                  else family.text_encoders[family.text_encoder_names.index(n)])]
            cpu = (" (on the CPU bitsandbytes uses its generic kernels: slower steps than the unquantized base, "
                   "same results)" if accelerator.device.type == "cpu" else "")
            accelerator.print(f"quantized base: {quantize.describe(quantization)} ({', '.join(quantized)}); "
                              f"{self.stats.phase_line('load')}{cpu}")
        family.freeze()
        models.check_lora_targets(family.denoiser, lora.lora_target_modules, family.default_lora_targets,
                                  run.lora_targets_flag)
        models.check_resolution(family.size_multiple(), resolution, bucket_steps)
        if os.path.isfile(source.path):  # a folder's tokenizers were checked before the load (config.validate)
            from dreambooth import prompt_lengths
            notes = []
            limits = [getattr(e.config, prompt_lengths.POSITION_KEY, None) for e in family.text_encoders]
            prompt_lengths.check_all(family, run.as_flags(), self.instance_images, limits, notes)
            for note in notes:
                log_main(note)
        self.stats.set(model_weights_fp32_mb=sum(p.numel() for m in family.frozen_modules()
                                                 for p in m.parameters()) * 4 / 2**20)
        return family

    def _prior_text(self):
        prior = self.run.prior
        if not prior.with_prior_preservation:
            return "off"
        return "base_output" if prior.base_output else f"on ({prior.num_class_images})"

    def _setup_class_priors(self, prior, model, memory, resolution, seed, output_dir):
        """Class images generated with the components just loaded, before LoRA is attached; cached by settings
        (the model's, the prompt, steps, seed, resolution and precision)."""
        from dreambooth import priors
        torch, accelerator, family = self.torch, self.accelerator, self.family
        class_dir = prior.class_data_dir or os.path.join(output_dir, "class_images")
        gen_dtype = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            prior.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")]
        from dreambooth import quantize
        quantization = self.run.quantization
        full = memory.sample_with_full_base or not quantization
        precision_name = str(gen_dtype).replace("torch.", "") + ("" if full else "+" + quantize.describe(quantization))
        settings, key = priors.prior_settings(model.pretrained_model_name_or_path, prior.class_prompt,
                                              prior.class_generation_steps, seed, resolution, precision_name,
                                              {"vae": model.pretrained_vae_model_name_or_path,
                                               "revision": model.revision, "variant": model.variant})
        count, batch_size = prior.num_class_images, prior.sample_batch_size

        def sampler():
            sampling = family
            if quantization and full:  # --sample_with_full_base: the unquantized base, for this alone (freed
                from dreambooth import families  # with the pipeline when generation ends)
                sampling = type(family).load(families.ModelSource.from_flags(model), self.weight_dtype)
                sampling.configure(**family.options)
            precision_context = priors.generation_precision(sampling.castable_modules(), accelerator.device,
                                                            self.weight_dtype, gen_dtype)
            pipe = sampling.sampling_pipeline()
            return priors.ClassImageSampler(lambda **kw: sampling.generate(pipe, **kw), precision_context,
                                            lambda p: sampling.sampling_embeddings(pipe, p))

        started = time.perf_counter()
        try:
            images, generated = priors.ensure_class_images(sampler, class_dir, count, settings, key, batch_size,
                                                           accelerator)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted while generating class images; the finished ones are kept in "
                                    f"{class_dir} and the same command continues from there") from None
        seconds = time.perf_counter() - started
        self.stats.set(class_images_generated=generated, class_generation_seconds=seconds)
        self.stats.phase("class_images")
        accelerator.print(f"class images: {len(images)} in {class_dir} ({generated} generated in {seconds:.1f}s)")
        return images

    def _setup_lora(self, settings, lora, training):
        """LoRA on the denoiser (and the text encoders), after the frozen parts reach the device; then the denoiser
        compiled, if asked, in place (Module.compile: parameter names, LoRA saving and checkpoints unchanged).
        settings: the LoRA's shape (models.LoraSettings); lora: its group (pivotal tuning); training: attention,
        checkpointing and compilation."""
        from dreambooth import models
        family = self.family
        compile_backend = training.dynamo_backend if training.torch_compile else None
        family.place(self.accelerator.device, self.weight_dtype)
        if training.enable_xformers_memory_efficient_attention:
            family.denoiser.enable_xformers_memory_efficient_attention()
        models.add_lora(family.denoiser, family.text_encoders, settings, family.text_encoder_lora_targets)
        lora_encoders = [e for e in family.text_encoders if getattr(e, "peft_config", None)]
        if training.gradient_checkpointing:
            family.denoiser.enable_gradient_checkpointing()
            for encoder in lora_encoders:  # transformers 5 renamed it; 4.x only has the old name
                getattr(encoder, "activation_checkpointing_enable", encoder.gradient_checkpointing_enable)()
        if compile_backend:
            family.denoiser.compile(backend=compile_backend)  # compiles on the first step; recompiles per bucket size
        self.pivotal = None
        if lora.train_text_encoder_ti:  # after LoRA: the new rows are a parameter of their own, kept fp32
            from dreambooth import pivotal
            mapping = pivotal.token_map(pivotal.abstractions(lora.token_abstraction),
                                        lora.num_new_tokens_per_abstraction)
            self.pivotal = pivotal.PivotalTokens(family, mapping).install(lora.initializer_concept, training.seed)
            words = ", ".join(f"{w} -> {''.join(t)}" for w, t in mapping.items())
            self.accelerator.print(f"pivotal tuning: {words} in {len(family.tokenizers)} tokenizer(s)")
        pivotal_encoders = self.pivotal.encoders() if self.pivotal else []
        # the encoders whose output changes as the run trains (LoRA or new token rows), in the family's order
        self.trained_text_encoders = [e for e in family.text_encoders
                                      if e in lora_encoders or any(e is p for p in pivotal_encoders)]

    def _setup_data(self, data_config, prior, memory, validation_prompt, seed, batch_size):
        """The dataset; prompts tokenized once; text embeddings and latents computed once whenever that is exact
        (unless turned off), with the text encoders or the VAE then off the device (unless memory says to keep
        them). data_config.cache_latents / pre_compute_text_embeddings None = decide here."""
        from dreambooth import data
        from dreambooth.families import PromptEncoder
        torch, family, d = self.torch, self.family, data_config
        precompute_text, cache_latents = d.pre_compute_text_embeddings, d.cache_latents
        class_prompt = prior.class_prompt
        self.dataset = data.DreamBoothDataset(
            self.instance_images, d.instance_prompt, self.class_images, class_prompt, d.resolution, d.center_crop,
            d.random_flip, d.repeats, d.image_interpolation_mode, seed, bucket_args=d.buckets,
            caption_dropout_rate=d.caption_dropout_rate)
        prompts = self.dataset.prompts
        if self.pivotal:  # TOK -> <s0><s1> in the instance prompt and every caption (the rows keep their order)
            prompts = [self.pivotal.prompt_example(p) for p in prompts]
        prior_ids = None
        if prior.base_output:  # the prior rows' prompts: the class (and captions without the trigger), and the
            from dreambooth.base_prior import prior_prompts  # empty prompt, where sampling guides from it
            class_prompts = prior_prompts(self.dataset.prompts, d.instance_prompt, class_prompt,
                                          list(self.pivotal.mapping) if self.pivotal else None)  # pivotal: its words
            uncond = len(prompts) + len(class_prompts) if family.samples_with_guidance else None
            prior_ids = (list(range(len(prompts), len(prompts) + len(class_prompts))), uncond)
            prompts = prompts + class_prompts + ([""] if uncond is not None else [])
        self.prompts = PromptEncoder(family, prompts, d.tokenizer_max_length, d.text_encoder_use_attention_mask,
                                     zero_ids=(prior_ids[1],) if prior_ids and family.empty_prompt_is_zeros else ())
        fixed_crops = self.dataset.crops_are_fixed()
        line = self._caching_line(precompute_text, cache_latents, fixed_crops)
        if precompute_text is None:  # exact whenever nothing that encodes the prompts trains (LoRA or new rows)
            precompute_text = not self.trained_text_encoders
        if cache_latents is None:
            cache_latents = fixed_crops
        self.precomputed_text, self.cached_latents = precompute_text, cache_latents
        self.record.pre_compute_text_embeddings = precompute_text  # what ran, for config.yaml and the card
        self.record.cache_latents = cache_latents
        self.validation_embeddings = None
        if precompute_text:
            self.prompts.precompute(self.weight_dtype)
            if validation_prompt:  # encoded now, so validation never brings the text encoders back
                with torch.no_grad():
                    self.validation_embeddings = family.sampling_embeddings(family.sampling_pipeline(),
                                                                            validation_prompt)
            for encoder in family.text_encoders if not memory.keep_frozen_on_device else ():
                encoder.to("cpu")  # frees device memory; moved back only for validation
        if cache_latents:
            with torch.no_grad():
                self.dataset.cache_latents(lambda px: family.latent_moments(px).cpu(),
                                           batch_size=prior.sample_batch_size)
            if not memory.keep_frozen_on_device:
                family.vae.to("cpu")
        self.stats.phase("caching")
        self.accelerator.print(line)
        self.base_prior = self._setup_base_prior(prior, prior_ids, seed) if prior_ids else None
        self.sampler = data.BucketBatchSampler(self.dataset, batch_size, seed)
        self.dataloader = torch.utils.data.DataLoader(
            self.dataset, batch_sampler=self.sampler, collate_fn=data.collate, num_workers=d.dataloader_num_workers,
            persistent_workers=d.dataloader_num_workers > 0,
            # Its own generator: iterator creation then draws no numbers from torch's global RNG, so a resumed
            # run's noise sequence matches the uninterrupted run's.
            generator=torch.Generator().manual_seed(seed or 0))

    def _setup_base_prior(self, prior, prior_ids, seed):
        """--prior_preservation_mode base_output: the base's own sampling paths (base_prior.py), with every LoRA
        off, before the first step: --num_class_images paths split over the sizes the run trains at."""
        from dreambooth import base_prior, training
        torch, family, accelerator = self.torch, self.family, self.accelerator
        class_ids, uncond_id = prior_ids
        scale = family.vae_scale()
        sizes = sorted(set(self.dataset.instance_sizes))  # (w, h) in pixels: one without buckets
        per_size = -(-prior.num_class_images // len(sizes))
        channels = family.vae.config.latent_channels
        base_prior.check_memory(per_size * len(sizes), prior.class_generation_steps, 3 if uncond_id is not None else 2,
                                (channels, max(h for _, h in sizes) // scale, max(w for w, _ in sizes) // scale),
                                self.weight_dtype, local_processes=int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        if per_size < len(class_ids):  # path i samples prompt i mod K: some captions would get none
            log_main(f"warning: --num_class_images {prior.num_class_images}: {per_size} sampling path"
                     f"{'s' * (per_size > 1)} per size for {len(class_ids)} prompts (the class prompt and the captions "
                     f"without the trigger); the last {len(class_ids) - per_size} get none: raise --num_class_images "
                     f"to {len(class_ids) * len(sizes)}")
        guidance = base_prior.guidance_scale(family)
        banks = {}
        with training.adapters_off([family.denoiser, *family.text_encoders]):
            for k, (w, h) in enumerate(sizes):
                def extras(n, size=(h, w)):  # SDXL's time ids as its pipeline samples: original = target, no crop
                    hw = torch.tensor([size] * n, dtype=torch.long)
                    return {"original_sizes": hw, "crop_top_lefts": torch.zeros_like(hw), "target_sizes": hw}
                banks[(h, w)] = base_prior.sample_paths(
                    family, family.denoiser, self.prompts, class_ids, uncond_id, num_paths=per_size,
                    steps=prior.class_generation_steps, guidance=guidance,
                    latent_shape=(channels, h // scale, w // scale), batch_extras=extras,
                    batch_size=prior.sample_batch_size, seed=seed or 0, device=accelerator.device,
                    dtype=self.weight_dtype, first_path=k * per_size)
        self.stats.phase("base prior")
        accelerator.print(f"prior: the base's own output on {per_size * len(sizes)} sampling paths "
                          f"({prior.class_generation_steps} steps) of {min(len(class_ids), per_size)} prompt"
                          f"{'s' * (min(len(class_ids), per_size) > 1)}" +
                          (f" and the empty prompt (guidance {guidance:g})" if uncond_id is not None else "")
                          + "; no class images")
        return base_prior.BasePriors(banks)

    def _caching_line(self, precompute_text, cache_latents, fixed_crops):
        """The start line's account of what a step will not pay for, and of what it still pays for and why.
        precompute_text / cache_latents: as asked (None = by default)."""
        if self.trained_text_encoders:
            text = "text encoders run every step (they train)"
        elif precompute_text is False:
            text = "text encoders run every step (--no-pre_compute_text_embeddings)"
        else:
            n = len(self.dataset.prompts)
            text = f"text embeddings of {n} prompt{'s' * (n > 1)} computed once, text encoders off the device"
        if cache_latents is False:
            latents = "VAE encodes every step (--no-cache_latents)"
        elif cache_latents or fixed_crops:
            how = "posterior mean and std" + (", both flips" if self.dataset.random_flip else "") + (
                "" if fixed_crops else ", one seeded crop per image instead of random crops")
            latents = f"latents computed once ({how}), VAE off the device"
        else:
            latents = ("VAE encodes every step: random crops of images of another shape; --center_crop or "
                       "--enable_bucket lets latents be computed once")
        return f"cache: {text}; {latents}"

    def _setup_optimizer(self, opt, lora, training):
        """Parameter groups (denoiser LoRA; text-encoder LoRA; new token rows), each with its learning rate and
        weight decay, the phases in which each trains (lora's *_frac), and the optimizer (dreambooth/optimizers.py).
        training: the batch, for --scale_lr."""
        from dreambooth import models, optimizers
        accelerator = self.accelerator
        scale = (training.train_batch_size * training.gradient_accumulation_steps * accelerator.num_processes
                 if opt.scale_lr else 1)
        lr, text_encoder_lr, text_decay = opt.learning_rate, opt.text_encoder_lr, opt.text_weight_decay
        denoiser_lora = models.trainable_parameters(self.family.denoiser)
        groups = [{"params": denoiser_lora, "lr": lr * scale}]
        # (last step, parameters): what trains only for the first share of the run (diffusers' *_frac flags)
        self.phases = [("train_transformer_frac", lora.train_transformer_frac, denoiser_lora)]
        text_lora = [p for e in self.trained_text_encoders for p in models.trainable_parameters(e)
                     if not self.pivotal or all(p is not q for q in self.pivotal.parameters())]
        if text_lora:  # --text_encoder_lr applies to every text encoder of the family
            groups.append({"params": text_lora, "lr": (text_encoder_lr or lr) * scale, "weight_decay": text_decay})
            self.phases.append(("train_text_encoder_frac", lora.train_text_encoder_frac, text_lora))
        if self.pivotal:
            rows = self.pivotal.parameters()
            groups.append({"params": rows, "lr": (text_encoder_lr or lr) * scale, "weight_decay": text_decay})
            self.phases.append(("train_text_encoder_ti_frac", lora.train_text_encoder_ti_frac, rows))
        self.lora_parameters = [p for group in groups for p in group["params"]]
        self.ema = None
        if opt.use_ema:  # an exponential moving average of every trained tensor; what is saved and validated
            from diffusers.training_utils import EMAModel
            self.ema = EMAModel(self.lora_parameters, decay=opt.ema_decay)
        trained = sum(p.numel() for p in self.lora_parameters)
        self.lora_bytes = 4 * trained + 2**20  # fp32 file, for space checks
        # the weights plus the optimizer's state for them (Prodigy keeps twice AdamW's, 8-bit AdamW a quarter)
        self.checkpoint_bytes = self.lora_bytes + optimizers.state_bytes(opt.optimizer, trained)
        self.optimizer = optimizers.build_optimizer(
            opt.optimizer, groups, betas=(opt.adam_beta1, opt.adam_beta2), weight_decay=opt.adam_weight_decay,
            eps=opt.adam_epsilon, device_type=accelerator.device.type, prodigy_beta3=opt.prodigy_beta3,
            prodigy_decouple=opt.prodigy_decouple, prodigy_use_bias_correction=opt.prodigy_use_bias_correction,
            prodigy_safeguard_warmup=opt.prodigy_safeguard_warmup)

    def _frozen_now(self, step):
        """Parameters whose share of the run is over at optimizer step `step` (0-based): their gradients are
        dropped, so no optimizer touches them (no update, no weight decay) while the graph stays the same."""
        return [p for _, end, params in self.phase_steps if step >= end for p in params]

    def _setup_schedule(self, training, opt, outputs):
        """Steps, epochs and the learning-rate schedule; then accelerate wraps what trains (and the checkpoint
        hooks that write the LoRA files into each checkpoint: outputs' formats)."""
        import math
        from diffusers.optimization import get_scheduler
        from dreambooth import checkpoints
        accelerator = self.accelerator
        steps_per_epoch = math.ceil(len(self.dataloader) / accelerator.num_processes
                                    / training.gradient_accumulation_steps)
        self.max_train_steps = training.max_train_steps or training.num_train_epochs * steps_per_epoch
        self.num_train_epochs = math.ceil(self.max_train_steps / steps_per_epoch)
        # diffusers' *_frac count epochs; steps are the same share, and exact for runs of a few epochs
        self.phase_steps = [(flag, math.ceil(frac * self.max_train_steps), params)
                            for flag, frac, params in self.phases]
        if outputs.resume_from_checkpoint:  # when the total comes from epochs, it is known only now
            checkpoints.check_resume_step(outputs.resume_from_checkpoint, self.max_train_steps)
        self.lr_scheduler = get_scheduler(opt.lr_scheduler, optimizer=self.optimizer,
                                          num_warmup_steps=opt.lr_warmup_steps * accelerator.num_processes,
                                          num_training_steps=self.max_train_steps * accelerator.num_processes,
                                          num_cycles=opt.lr_num_cycles, power=opt.lr_power)
        trained = [self.family.denoiser, *self.trained_text_encoders]
        *trained, self.optimizer, self.dataloader, self.lr_scheduler = accelerator.prepare(
            *trained, self.optimizer, self.dataloader, self.lr_scheduler)
        self.denoiser, self.text_encoders = trained[0], trained[1:]  # wrapped (DDP) where several processes train
        if self.text_encoders:  # prompts are encoded by the training ones
            wrapped = dict(zip(map(id, self.trained_text_encoders), self.text_encoders))
            self.family.text_encoders = [wrapped.get(id(e), e) for e in self.family.text_encoders]
        checkpoints.register_lora_state_hooks(accelerator, self.family, self.denoiser, self.family.text_encoders,
                                              (lambda folder: self._save_kohya(folder, True)) if outputs.kohya
                                              else None,
                                              self.pivotal, self._embedding_name())

    def _embedding_name(self):
        from dreambooth import pivotal
        return pivotal.embedding_file_name(self.run.outputs.output_dir) if self.pivotal else None

    def _setup_resume(self, outputs, ema_decay):
        """Weights, optimizer, schedule, RNG states and the exact batch position; then the output folder exists.
        ema_decay: this command's, which replaces the checkpoint's."""
        from dreambooth import checkpoints
        accelerator = self.accelerator
        resume_dir, output_dir, overwrite = (outputs.resume_from_checkpoint, outputs.output_dir,
                                             outputs.overwrite_output_dir)
        self.position = checkpoints.RunPosition()
        accelerator.register_for_checkpointing(self.position)
        if self.ema is not None:  # its shadow weights resume with the rest (the checkpoint's LoRA file is the live one)
            accelerator.register_for_checkpointing(self.ema)
        if resume_dir:
            ours = checkpoints.flag_settings(self.optimizer)
            checkpoints.load_checkpoint(accelerator, resume_dir)
            # the checkpoint brings back its own learning rates, betas, decay and EMA decay: the flags of this
            # command win, so "lower --learning_rate and resume" does what it says
            changed = checkpoints.apply_flag_settings(self.optimizer, self.lr_scheduler, ours)
            if self.ema is not None:
                self.ema.decay = ema_decay
            now = "".join(sorted({f"; {'learning rate' if k == 'initial_lr' else k.replace('_', ' ')} now {new} "
                                  f"(the checkpoint's: {old})" for _, k, old, new in changed}))
            accelerator.print(f"resumed from {resume_dir} at step {self.position.step}{now}")
        if accelerator.is_main_process:
            os.makedirs(output_dir, exist_ok=True)  # only now: a run that failed above leaves no outputs (class
            # images generated into output_dir/class_images stay: a cache the next run reuses)
            if overwrite and not resume_dir:  # the previous run's own files only; the note says what stayed
                from dreambooth import outputs
                note = outputs.kept_note(output_dir, outputs.clear_previous_run(output_dir))
                if note:
                    print(note, file=sys.stderr, flush=True)
            from dreambooth.config import run_settings
            from dreambooth.redaction import scrub_values
            accelerator.init_trackers("dreambooth-lora", config=scrub_values({
                k: v for k, v in run_settings(self.run, self.record).items()
                if isinstance(v, (int, float, str, bool))}))

    # ---- the loop -------------------------------------------------------------------------------------------
    def train(self):
        """Returns the exit code: 0, 3 (non-finite loss or gradient) or 128 + signal."""
        from tqdm.auto import tqdm
        from dreambooth import checkpoints, optimizers, training
        run, accelerator, position, torch = self.run, self.accelerator, self.position, self.torch
        allow_nan_steps, validation = run.training.allow_nan_steps, run.validation
        stopper = self.stopper = checkpoints.GracefulStop()
        reader = training.StepReader(accelerator, validation.logging_steps, checkpoints.agree)
        self.reader = reader
        self.progress = tqdm(range(self.max_train_steps), initial=position.step, desc="steps",
                             disable=not accelerator.is_local_main_process)
        first_epoch, skip_batches = position.epoch, position.batches
        nan_steps, micro_losses = 0, []  # this step's micro-batch losses, on the device
        micro = 0  # this micro-batch's place in its accumulation window (a skipped one keeps its place)
        accelerator.print("memory: " + "; ".join(self.stats.phase_line(p) for p in self.stats.values["phase_peaks"]))
        self.stats.mark_training_start()
        try:
            for epoch in range(first_epoch, self.num_train_epochs):
                for model in (self.denoiser, *self.text_encoders):
                    model.train()
                self.sampler.start_epoch(epoch)
                if epoch == first_epoch and skip_batches:
                    batches = accelerator.skip_first_batches(self.dataloader, skip_batches)
                else:
                    batches, position.epoch, position.batches = self.dataloader, epoch, 0
                for batch in batches:
                    position.batches += 1
                    with accelerator.accumulate(self.denoiser, *self.text_encoders):
                        loss = training.training_loss(self.family, self.denoiser, self.objective, self.prompts, batch,
                                                      run.prior.prior_loss_weight,
                                                      device=accelerator.device, weight_dtype=self.weight_dtype,
                                                      cached_latents=self.cached_latents,
                                                      with_class_images=bool(self.class_images),
                                                      prior_rows=self._prior_rows(batch, micro))
                        micro = 0 if accelerator.sync_gradients else micro + 1
                        if allow_nan_steps:  # skipping a bad step needs its loss before the update: a sync per step
                            (value,), _ = checkpoints.agree(accelerator, [loss], False)
                            if value != value or value in (float("inf"), float("-inf")):
                                nan_steps += 1
                                if nan_steps > allow_nan_steps:
                                    raise training.NonFinite("loss", value, position.step + 1)
                                self._say(f"warning: loss is {value} at step {position.step + 1}; step skipped "
                                          f"({nan_steps}/{allow_nan_steps} allowed)")
                                self.optimizer.zero_grad(set_to_none=True)
                                micro_losses = []
                                continue
                        grad_norm = training.optimizer_step(accelerator, loss, self.lora_parameters, self.optimizer,
                                                            self.lr_scheduler, run.optimizer.max_grad_norm,
                                                            drop_grads=self._frozen_now(position.step))
                        micro_losses.append(loss.detach())
                    if not accelerator.sync_gradients:
                        continue
                    position.step += 1
                    if self.ema is not None:
                        self.ema.step(self.lora_parameters)
                    self.stats.step_done()
                    self.progress.update(1)
                    # the rate the first group really got: Prodigy's d x lr, the schedule's lr otherwise
                    reader.add(training.PendingStep(position.step, optimizers.effective_lr(
                                                        self.optimizer, self.lr_scheduler.get_last_lr()[0]),
                                                    torch.stack(micro_losses).mean(), grad_norm))
                    micro_losses = []
                    code = self._between_steps(reader, stopper)
                    if code is not None:
                        return code
                    if position.step >= self.max_train_steps:
                        break
                if position.step >= self.max_train_steps:
                    break
                if validation.validation_prompt and validation.validation_epochs and \
                        epoch % validation.validation_epochs == 0:  # as diffusers
                    self._validate(position.step)
                    self.stats.pause_done()
        except training.NonFinite as bad:
            return self._non_finite_stop(bad)
        self.progress.close()
        return 0

    def _prior_rows(self, batch, micro):
        """base_output's prior rows for this micro-batch (micro: its place in the accumulation window), at its size."""
        if self.base_prior is None:
            return None
        from dreambooth.base_prior import positions
        t, accelerator = self.run.training, self.accelerator
        where = positions(self.position.step, micro, t.gradient_accumulation_steps, accelerator.process_index,
                          accelerator.num_processes, t.train_batch_size, len(batch["prompt_ids"]))
        return self.base_prior.rows(where, batch["target_sizes"][0].tolist(), accelerator.device, self.weight_dtype)

    def _between_steps(self, reader, stopper):
        """Everything that happens between two optimizer steps, in one place: the deferred loss read, NaN checks,
        checkpoints, validation and stop requests. Returns an exit code to stop with, or None to go on."""
        outputs, validation = self.run.outputs, self.run.validation
        accelerator, step, torch = self.accelerator, self.position.step, self.torch
        checkpoint_due = step % outputs.checkpointing_steps == 0
        validation_due = bool(validation.validation_prompt and validation.validation_steps
                              and step % validation.validation_steps == 0)
        single_stop = stopper.requested and accelerator.num_processes == 1  # several processes: agreed at reads
        if not reader.due(step, checkpoint_due or validation_due or step >= self.max_train_steps or single_stop):
            return None  # nothing read back this step: the GPU keeps its queue
        loss, lr, stop_now = reader.read(stopper.requested)  # the loop's only host sync; raises NonFinite
        self.progress.set_postfix(loss=loss, lr=lr)
        if checkpoint_due or stop_now:
            from dreambooth import checkpoints, training
            # a finite loss read does not prove finite weights (an update can overflow): one more sync, at
            # checkpoints only, so that a checkpoint is always one to resume from
            if not bool(torch.stack([p.detach().isfinite().all() for p in self.lora_parameters]).all()):
                raise training.NonFinite("a LoRA weight", "not finite", step)
            path = checkpoints.save_checkpoint(accelerator, outputs.output_dir, step, dict(self.run.checkpoint_settings),
                                               outputs.checkpoints_total_limit, self.checkpoint_bytes)
            if stop_now:
                self._say(f"stopped by signal at step {step}; checkpoint saved to {path}\n"
                          f"resume with the same command plus --resume_from_checkpoint latest")
                accelerator.end_training()
                return 128 + stopper.requested
        if validation_due:
            self._validate(step)
        self.stats.pause_done()  # checkpoint and validation time is not step time
        return None

    def _say(self, message):
        """Messages during the loop go above the progress bar, not into its line (main process only)."""
        if self.accelerator.is_main_process:
            self.progress.write(message, file=sys.stderr)

    def _non_finite_stop(self, bad):
        """A non-finite loss or gradient ruins the LoRA: stop, naming the step, the fix and the checkpoint to
        resume from (written only after its steps were read as finite)."""
        from dreambooth import checkpoints
        good = checkpoints.latest_good(self.run.outputs.output_dir)  # finite weights, not only finite losses
        self._say(f"{PROG}: error: {bad.what} is {bad.value} at step {bad.step}; lower --learning_rate (now "
                  f"{self.run.optimizer.learning_rate}) or use --mixed_precision bf16. Last good checkpoint: "
                  + (f"{good} (add --resume_from_checkpoint {good} to the changed command)" if good else
                     "none (start again)")
                  + (" (--allow_nan_steps N skips a few such steps)" if bad.what == "loss" else ""))
        self.accelerator.end_training()
        return 3

    def _validate(self, step):
        """Grids under output_dir/validation/, from the EMA weights with --use_ema (the live ones come back after)."""
        if self.ema is not None and self.accelerator.is_main_process:
            self.ema.store(self.lora_parameters)
            self.ema.copy_to(self.lora_parameters)
            try:
                return self._validate_now(step)
            finally:
                self.ema.restore(self.lora_parameters)
        return self._validate_now(step)

    def _validate_now(self, step):
        """Grids under output_dir/validation/; the frozen parts come back to the device only for this."""
        if not self.accelerator.is_main_process:
            return
        from diffusers.training_utils import offload_models
        from dreambooth import validation
        run, accelerator, family, torch = self.run, self.accelerator, self.family, self.torch
        prompt = run.validation.validation_prompt
        denoiser = accelerator.unwrap_model(self.denoiser)
        text_encoders = [accelerator.unwrap_model(e) for e in family.text_encoders]
        trained = [denoiser, *(text_encoders if self.text_encoders else [])]
        for model in trained:
            model.eval()  # no LoRA dropout while sampling
        # the parts moved off the device after caching come back for this only, and go back after it; with the
        # validation prompt encoded up front (frozen text encoders), only the VAE does
        returning = [family.vae] if self.validation_embeddings else [*text_encoders, family.vae]
        with offload_models(*returning, device=accelerator.device), \
                torch.autocast(accelerator.device.type, dtype=self.weight_dtype,
                               enabled=self.weight_dtype != torch.float32):
            pipe = family.sampling_pipeline(denoiser, text_encoders)
            prompt = self.pivotal.prompt_example(prompt) if self.pivotal else prompt
            validation.run_validation(lambda **kw: family.generate(pipe, **kw), accelerator.device,
                                      self.validation_embeddings or {"prompt": prompt},
                                      run.validation.num_validation_images, run.data.resolution, run.training.seed,
                                      os.path.join(run.outputs.output_dir, "validation", f"step-{step:06d}.png"),
                                      accelerator, step)
        for model in trained:
            model.train()

    # ---- outputs --------------------------------------------------------------------------------------------
    def finish(self):
        """LoRA files, model card, effective config, last validation grid, plots; then the Hub upload."""
        from dreambooth import lora_io, report
        run, record, accelerator, step = self.run, self.record, self.accelerator, self.position.step
        output_dir, validation, hub_config = run.outputs.output_dir, run.validation, run.hub
        stop = self.stopper  # a signal from here on: the LoRA files are written, the long optional parts skipped
        stop.then = ("writing the final LoRA files, then stopping (the final validation images and the Hub upload "
                     "are skipped)")
        accelerator.wait_for_everyone()
        if self.ema is not None:  # the run's result is the average; the live weights are not needed after this
            self.ema.copy_to(self.lora_parameters)
        final_validation = validation.validation_prompt and not validation.skip_final_inference
        if accelerator.is_main_process:
            denoiser = accelerator.unwrap_model(self.denoiser)
            text_encoders = [accelerator.unwrap_model(e) for e in self.family.text_encoders]
            check_free_space(output_dir, self.lora_bytes, "the LoRA weights")
            lora_io.save_diffusers_lora(output_dir, self.family, denoiser, text_encoders,
                                        self.pivotal.lora_metadata(self._embedding_name()) if self.pivotal else None)
            if self.pivotal:
                self.pivotal.save(os.path.join(output_dir, self._embedding_name()))
            kohya_file = self._save_kohya(output_dir) if run.outputs.kohya else None
            if final_validation and not stop.requested:
                self._validate_now(step)  # the parameters hold the EMA weights already
            report.plot_loss(self.reader.history, os.path.join(output_dir, "loss.png"))
            self.stats.set(final_step=step)  # also how a later --resume_from_checkpoint knows the run finished
            self.stats.write(os.path.join(output_dir, "train_stats.json"))
            report.write_run_files(run, record, step, self.progress.format_dict.get("elapsed", 0), self.family,
                                   kohya_file, pivotal=report.pivotal_usage(run, record, self.pivotal,
                                                                            self._embedding_name()))
            accelerator.print(f"done: {step} steps; LoRA weights in {output_dir}/{lora_io.LORA_WEIGHT_NAME}")
        accelerator.end_training()
        logging_dir = validation.logging_dir
        extra = [logging_dir.rstrip("/") + "/"] if not os.path.isabs(logging_dir) else []
        if hub_config.push_to_hub and accelerator.is_main_process:
            from dreambooth import hub, outputs
            extra += outputs.upload_excludes(output_dir, run.outputs.output_format, run.lora.train_text_encoder_ti,
                                             ignored=list(hub.IGNORE) + extra)  # never what the run did not write
        if stop.requested:
            if accelerator.is_main_process:
                skipped = " (final validation images skipped)" if final_validation else ""
                upload = ""
                if hub_config.push_to_hub:  # hub was imported above for the excludes
                    retry = hub.retry_command(output_dir, record.hub_repo_id, hub_config.hub_token,
                                              (*hub.IGNORE, *extra))
                    upload = f"; the Hub upload was skipped, to do it: {retry}"
                print(f"stopped by signal after the last step: the LoRA files are complete in {output_dir}{skipped}"
                      f"{upload}", file=sys.stderr)
            return 128 + stop.requested
        stop.then = "finishing the Hub upload (everything else is written), then exiting"
        if hub_config.push_to_hub and accelerator.is_main_process:
            from dreambooth.hub import upload_run
            uploaded, message = upload_run(output_dir, record.hub_repo_id, hub_config.hub_token, extra_ignore=extra)
            print(message, file=sys.stdout if uploaded else sys.stderr)
            if not uploaded:
                return 4  # trained and saved, but the asked-for upload did not happen: scripts should notice
        stop.then = "the run is complete; exiting"  # a signal from here on has nothing left to stop
        return 0

    def _save_kohya(self, folder, intermediate=False):
        """The kohya-layout file for ComfyUI/A1111: <output_dir name>.safetensors, and in a checkpoint folder
        <name>-step00000N.safetensors as sd-scripts names intermediate saves (the UIs list both apart)."""
        from dreambooth import kohya_metadata, lora_io, optimizers, outputs, report
        run, accelerator, step = self.run, self.accelerator, self.position.step
        data, lora, opt, model = run.data, run.lora, run.optimizer, run.model
        name = outputs.run_name(run.outputs.output_dir)
        output_name = f"{name}-step{step:08d}" if intermediate else name
        captions = [self.dataset.prompts[i] for i in self.dataset.instance_prompt_ids]
        source = data.dataset_name or data.instance_data_dir
        kohya_run = lora_io.KohyaRun(
            output_name=output_name, base_model=str(model.pretrained_model_name_or_path),
            instance_prompt=data.instance_prompt, rank=lora.rank, alpha=lora.lora_alpha or lora.rank, steps=step,
            max_train_steps=self.max_train_steps, resolution=data.resolution, learning_rate=opt.learning_rate,
            text_encoder_lr=opt.text_encoder_lr or opt.learning_rate, train_text_encoder=bool(lora.train_text_encoder),
            use_dora=bool(lora.use_dora), lora_dropout=lora.lora_dropout,
            optimizer=optimizers.describe(opt.optimizer, self.optimizer),
            lr_scheduler=opt.lr_scheduler, seed=run.training.seed, mixed_precision=self.record.mixed_precision,
            num_train_images=len(self.instance_images) * data.repeats, num_reg_images=len(self.class_images),
            prior_loss_weight=run.prior.prior_loss_weight, repeats=data.repeats,
            tag_frequency=kohya_metadata.tag_frequency(os.path.basename(os.path.normpath(source)), data.repeats,
                                                       captions),
            started_at=self.started_at, finished_at=time.time(), session_id=int(self.started_at * 1000) % 2**31,
            license=report.base_license(str(model.pretrained_model_name_or_path), self.family, model.cache_dir,
                                        model.revision)[0],
            extra=report.training_metadata(data.instance_prompt, self.pivotal, self._embedding_name()))
        return lora_io.save_kohya_lora(folder, output_name, self.family, accelerator.unwrap_model(self.denoiser),
                                       [accelerator.unwrap_model(e) for e in self.family.text_encoders], kohya_run)

    def cleanup(self):
        """After an error or interrupt: close the trackers, so their files are complete (a finished or stopped
        run has ended them already)."""
        if self.accelerator is not None:
            self.accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
