#!/usr/bin/env python
"""DreamBooth LoRA training for Stable Diffusion 1.x / 2.x.

    accelerate launch train_dreambooth_lora.py \
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \
      --instance_data_dir ./dog --instance_prompt "a photo of sks dog" \
      --with_prior_preservation --class_prompt "a photo of dog" --output_dir work_dirs/sd15_dog

Flags follow diffusers' examples/dreambooth/train_dreambooth_lora.py. Reading order: flags are
checked (no model loaded yet), the base model is loaded and frozen, missing class priors are
generated, LoRA is attached, then one accelerate loop trains and checkpoints. The output folder
gets pytorch_lora_weights.safetensors that `pipe.load_lora_weights(output_dir)` loads as is.
"""
import math
import os
import sys
import time

from dreambooth import __version__
from dreambooth.config import effective_config, parse_args, validate
from dreambooth.files import check_free_space
from dreambooth.errors import run_cli

PROG = "train_dreambooth_lora.py"


def log_main(message):
    """Before accelerate starts we only know our rank from the launcher's environment."""
    if os.environ.get("RANK", "0") == "0":
        print(message, file=sys.stderr, flush=True)


def main(argv=None):
    """Exit codes: 0 done, 2 bad input (one line), 3 non-finite loss, 128+N stopped by signal N, 1 a bug."""
    return run_cli(PROG, _main, argv)


def _main(argv):
    from dreambooth.report import RunStats
    stats = RunStats()
    args = parse_args(argv)
    instance_images = validate(args, warn=log_main)
    if args.push_to_hub and os.environ.get("RANK", "0") == "0":  # as diffusers: the repo exists before training
        from dreambooth.hub import prepare_repo
        args._hub_repo_id = prepare_repo(args.hub_model_id, args.output_dir, args.hub_token)
    return train(args, instance_images, stats)


def checkpoints_early_signals():
    """Under a one-process `accelerate launch`, a SIGTERM to the launcher must reach us (see
    checkpoints.term_when_parent_dies); asked for first, so a kill during loading ends us too."""
    from dreambooth.checkpoints import term_when_parent_dies
    term_when_parent_dies()


def diffusion_target(noise_scheduler, latents, noise, timesteps):
    """What the UNet must predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x 768)."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return noise_scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {kind}; use --prediction_type epsilon or v_prediction")


def snr_loss_weights(noise_scheduler, timesteps, snr_gamma):
    """Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR, or / (SNR + 1) for v-prediction."""
    import torch
    from diffusers.training_utils import compute_snr
    snr = compute_snr(noise_scheduler, timesteps)
    weights = torch.clamp(snr, max=snr_gamma)
    return weights / (snr + 1) if noise_scheduler.config.prediction_type == "v_prediction" else weights / snr


def prior_preservation_loss(per_example_loss, num_instance, prior_loss_weight):
    """Instance loss + prior_loss_weight x class loss; the batch is [instance..., class...]."""
    if per_example_loss.shape[0] == num_instance:
        return per_example_loss.mean()
    instance, prior = per_example_loss[:num_instance], per_example_loss[num_instance:]
    return instance.mean() + prior_loss_weight * prior.mean()


def train(args, instance_images, stats):
    # Heavy imports after the flags are checked: a typo costs a second, not a model load.
    import datetime

    checkpoints_early_signals()
    from dreambooth.quiet import quiet_libraries
    quiet_libraries()  # first: some notices are printed at import time
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, InitProcessGroupKwargs, ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from dreambooth import checkpoints, data, lora_io, models, priors, report, validation

    # diffusers and transformers import lazily: load the model code now, so this baseline is the runtime's
    # own memory (python, torch, libraries) and everything above it is the run's.
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel  # noqa: F401
    stats.baseline_rss_mb = report.current_rss_mb()

    # ---- accelerate: devices, mixed precision, accumulation, trackers -------------------------------
    trackers = report.available_trackers(args.report_to, warn=log_main)
    # torchrun on a machine without GPUs: accelerate only picks gloo multi-CPU when told it is on CPU.
    cpu_ddp = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    accelerator = Accelerator(
        cpu=cpu_ddp, gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=os.path.join(args.output_dir, args.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=args.ddp_timeout))])
    if args.seed is not None:
        set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    resume_dir = args.resume_from_checkpoint  # resolved and checked by validate()
    check_free_space(args.output_dir, 50 * 2**20, "LoRA weights and checkpoints")
    accelerator.print(
        f"dreambooth-lora {__version__} | model={args.pretrained_model_name_or_path} images={len(instance_images)} "
        f"prior={'on (' + str(args.num_class_images) + ')' if args.with_prior_preservation else 'off'} "
        f"res={args.resolution} batch={args.train_batch_size}x{args.gradient_accumulation_steps}"
        f"x{accelerator.num_processes} lr={args.learning_rate} rank={args.rank} "
        f"text_encoder={'lora' if args.train_text_encoder else 'frozen'} precision={accelerator.mixed_precision} "
        f"device={accelerator.device} out={args.output_dir}")

    # ---- base model: frozen, in the weight dtype ------------------------------------------------------
    tokenizer, text_encoder, vae, unet, noise_scheduler = models.load_components(
        args.pretrained_model_name_or_path, args.revision, args.variant, args.tokenizer_name,
        args.single_file_config, args.prediction_type, weight_dtype)
    models.freeze(text_encoder, vae, unet)
    models.check_lora_targets(unet, args.lora_target_modules)
    models.check_resolution(vae, unet, args.resolution, args.bucket_reso_steps if args.enable_bucket else None)
    accelerator.print(f"prediction_type={noise_scheduler.config.prediction_type} "
                      f"scheduler={type(noise_scheduler).__name__} unet_params={sum(p.numel() for p in unet.parameters())}")
    stats.set(model_weights_fp32_mb=sum(p.numel() for m in (text_encoder, vae, unet) for p in m.parameters()) * 4 / 2**20)

    # ---- class priors: generated with the components just loaded, before LoRA is attached -------------
    class_images = []
    if args.with_prior_preservation:
        gen_dtype = {"fp32": torch.float32, "no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
            args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")]
        settings, key = priors.prior_settings(args.pretrained_model_name_or_path, args.class_prompt,
                                              args.class_generation_steps, args.seed, args.resolution,
                                              str(gen_dtype).replace("torch.", ""))
        class_dir = args.class_data_dir or os.path.join(args.output_dir, "class_images")

        def generation_pipeline():
            precision = priors.generation_precision((text_encoder, vae, unet), accelerator.device, weight_dtype,
                                                    gen_dtype)
            return validation.sampling_pipeline(tokenizer, text_encoder, vae, unet, noise_scheduler), precision

        started = time.perf_counter()
        try:
            class_images, generated = priors.ensure_class_images(generation_pipeline, class_dir, args.num_class_images,
                                                                 settings, key, args.sample_batch_size, accelerator)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(f"interrupted while generating class images; the finished ones are kept in "
                                    f"{class_dir} and the same command continues from there") from None
        seconds = time.perf_counter() - started
        stats.set(class_images_generated=generated, class_generation_seconds=seconds)
        accelerator.print(f"class images: {len(class_images)} in {class_dir} ({generated} generated in {seconds:.1f}s)")

    unet.to(accelerator.device, dtype=weight_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    models.add_lora(unet, text_encoder, args)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
        if args.train_text_encoder:
            text_encoder.gradient_checkpointing_enable()

    # ---- data: prompts tokenized once; optionally latents and text embeddings computed once -----------
    dataset = data.DreamBoothDataset(
        instance_images, args.instance_prompt, class_images, args.class_prompt, args.resolution,
        args.center_crop, args.random_flip, args.repeats, args.image_interpolation_mode, args.seed,
        bucket_args=(args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) if args.enable_bucket else None)
    prompt_tokens = models.tokenize(tokenizer, dataset.prompts, args.tokenizer_max_length)
    prompt_conditioning = None  # {unet kwarg: tensor [prompts, ...]} when the fixed prompts are encoded once
    if args.pre_compute_text_embeddings:
        with torch.no_grad():
            prompt_conditioning = {k: v.to(weight_dtype) for k, v in
                                   models.encode_prompts(text_encoder, prompt_tokens,
                                                         args.text_encoder_use_attention_mask).items()}
        text_encoder.to("cpu")  # frees device memory; moved back only for validation
    if args.cache_latents:
        with torch.no_grad():
            dataset.cache_latents(lambda px: vae.encode(px.to(accelerator.device, weight_dtype)).latent_dist.sample()
                                  * vae.config.scaling_factor, batch_size=args.sample_batch_size)
        vae.to("cpu")
    sampler = data.BucketBatchSampler(dataset, args.train_batch_size, args.seed)
    train_dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=data.collate, num_workers=args.dataloader_num_workers,
        persistent_workers=args.dataloader_num_workers > 0,
        # Its own generator: iterator creation then draws no numbers from torch's global RNG, so a resumed
        # run's noise sequence matches the uninterrupted run's.
        generator=torch.Generator().manual_seed(args.seed or 0))

    # ---- optimizer and schedule --------------------------------------------------------------------
    lr_scale = args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes \
        if args.scale_lr else 1
    param_groups = [{"params": models.trainable_parameters(unet), "lr": args.learning_rate * lr_scale}]
    if args.train_text_encoder:
        param_groups.append({"params": models.trainable_parameters(text_encoder),
                             "lr": (args.text_encoder_lr or args.learning_rate) * lr_scale})
    lora_parameters = [p for group in param_groups for p in group["params"]]
    lora_bytes = 4 * sum(p.numel() for p in lora_parameters) + 2**20  # fp32 LoRA file, for free-space checks
    checkpoint_bytes = 3 * lora_bytes  # the LoRA weights plus AdamW's two moments
    if args.use_8bit_adam:
        import bitsandbytes as bnb
        optimizer_class, fused_kwargs = bnb.optim.AdamW8bit, {}
    else:
        # One fused kernel over all LoRA tensors instead of a Python loop over them (5x faster on CPU too).
        optimizer_class = torch.optim.AdamW
        fused_kwargs = {"fused": True} if accelerator.device.type == "cuda" or (
            accelerator.device.type == "cpu" and torch.__version__ >= "2.4") else {}
    optimizer = optimizer_class(param_groups, betas=(args.adam_beta1, args.adam_beta2),
                                weight_decay=args.adam_weight_decay, eps=args.adam_epsilon, **fused_kwargs)
    steps_per_epoch = math.ceil(len(train_dataloader) / accelerator.num_processes / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    num_train_epochs = math.ceil(max_train_steps / steps_per_epoch)
    if resume_dir:
        checkpoints.check_resume_step(resume_dir, max_train_steps)  # when it comes from epochs, known only now
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes,
                                 num_cycles=args.lr_num_cycles, power=args.lr_power)
    trained = [unet, text_encoder] if args.train_text_encoder else [unet]
    *trained, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        *trained, optimizer, train_dataloader, lr_scheduler)
    unet = trained[0]
    if args.train_text_encoder:
        text_encoder = trained[1]
    checkpoints.register_lora_state_hooks(accelerator, unet, text_encoder if args.train_text_encoder else None)

    # ---- resume: weights, optimizer, schedule, RNG states and the exact batch position -------------------
    position = checkpoints.RunPosition()
    accelerator.register_for_checkpointing(position)
    if resume_dir:
        checkpoints.load_checkpoint(accelerator, resume_dir)
        accelerator.print(f"resumed from {resume_dir} at step {position.step}")
    first_epoch, skip_batches = position.epoch, position.batches
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)  # only now: a run that failed above leaves nothing behind
        if args.overwrite_output_dir and not resume_dir:
            checkpoints.clear_previous_run(args.output_dir)
        accelerator.init_trackers("dreambooth-lora", config={k: v for k, v in effective_config(args).items()
                                                             if isinstance(v, (int, float, str, bool))})

    def sample_validation(step):
        """Grids under output_dir/validation/; the frozen parts come back to the device only for this."""
        text_encoder.to(accelerator.device)
        vae.to(accelerator.device)
        pipe = validation.sampling_pipeline(tokenizer, accelerator.unwrap_model(text_encoder), vae,
                                            accelerator.unwrap_model(unet), noise_scheduler)
        with torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
            validation.run_validation(pipe, args.validation_prompt, args.num_validation_images, args.resolution,
                                      args.seed, os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"),
                                      accelerator, step)
        if args.pre_compute_text_embeddings:
            text_encoder.to("cpu")
        if args.cache_latents:
            vae.to("cpu")

    def training_loss(batch):
        """Noise the latents at random timesteps; score the UNet's prediction against the scheduler's target."""
        if args.cache_latents:
            latents = batch["images"].to(accelerator.device, weight_dtype)
        else:
            with torch.no_grad():
                latents = vae.encode(batch["images"].to(accelerator.device, weight_dtype)).latent_dist.sample()
            latents = latents * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        if args.noise_offset:
            noise += args.noise_offset * torch.randn(latents.shape[:2] + (1, 1), device=latents.device,
                                                     dtype=latents.dtype)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  device=latents.device)
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        conditioning = models.unet_conditioning(text_encoder, prompt_tokens, batch, prompt_conditioning,
                                                args.text_encoder_use_attention_mask)
        model_pred = unet(noisy_latents, timesteps, return_dict=False, **conditioning)[0]
        target = diffusion_target(noise_scheduler, latents, noise, timesteps)
        per_example = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
        if args.snr_gamma:
            per_example = per_example * snr_loss_weights(noise_scheduler, timesteps, args.snr_gamma)
        num_instance = latents.shape[0] // (2 if class_images else 1)
        return prior_preservation_loss(per_example, num_instance, args.prior_loss_weight)

    # ---- the loop ---------------------------------------------------------------------------------------
    stopper = checkpoints.GracefulStop()
    progress = tqdm(range(max_train_steps), initial=position.step, desc="steps",
                    disable=not accelerator.is_local_main_process)
    stats.mark_training_start()
    nan_steps, loss_history = 0, []
    micro_losses = []  # this step's micro-batch losses, on the device
    unread = []  # (step, lr, loss, grad norm) not yet read back: reading makes the CPU wait for the GPU

    def say(message):
        """Messages during the loop go above the progress bar, not into its line (main process only)."""
        if accelerator.is_main_process:
            progress.write(message, file=sys.stderr)

    def nan_stop(what, value, step):
        """A non-finite loss or gradient ruins the LoRA: stop, naming the step, the fix and the checkpoint to
        resume from (written only after its steps were read as finite)."""
        say(f"{PROG}: error: {what} is {value} at step {step}; lower --learning_rate (now {args.learning_rate}) or "
            f"use --mixed_precision bf16. Last good checkpoint: {checkpoints.latest(args.output_dir) or 'none'}"
            + (" (--allow_nan_steps N skips a few such steps)" if what == "loss" else ""))
        accelerator.end_training()
        return 3

    for epoch in range(first_epoch, num_train_epochs):
        unet.train()
        if args.train_text_encoder:
            text_encoder.train()
        sampler.start_epoch(epoch)
        if epoch == first_epoch and skip_batches:
            batches = accelerator.skip_first_batches(train_dataloader, skip_batches)
        else:
            batches, position.epoch, position.batches = train_dataloader, epoch, 0
        for batch in batches:
            position.batches += 1
            with accelerator.accumulate(*trained):
                loss = training_loss(batch)
                if args.allow_nan_steps:  # skipping a bad step needs its loss before the update: a sync per step
                    (loss_value,), _ = checkpoints.agree(accelerator, [loss], False)
                    if not math.isfinite(loss_value):
                        nan_steps += 1
                        if nan_steps > args.allow_nan_steps:
                            return nan_stop("loss", loss_value, position.step + 1)
                        say(f"warning: loss is {loss_value} at step {position.step + 1}; step skipped "
                            f"({nan_steps}/{args.allow_nan_steps} allowed)")
                        optimizer.zero_grad(set_to_none=True)
                        micro_losses = []
                        continue
                accelerator.backward(loss)
                micro_losses.append(loss.detach())
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(lora_parameters, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)

            if accelerator.sync_gradients:
                position.step += 1
                stats.step_done()
                progress.update(1)
                unread.append((position.step, lr_scheduler.get_last_lr()[0], torch.stack(micro_losses).mean(),
                               grad_norm))
                micro_losses = []
                checkpoint_due = position.step % args.checkpointing_steps == 0
                validation_due = args.validation_prompt and args.validation_steps and \
                    position.step % args.validation_steps == 0
                read_now = (position.step % args.logging_steps == 0 or checkpoint_due or validation_due
                            or position.step >= max_train_steps
                            or (stopper.requested and accelerator.num_processes == 1))  # several: agreed at reads
                if not read_now:
                    continue  # nothing read back this step: the GPU keeps its queue
                # The only host sync of the loop: losses and gradient norms since the last read (agreed across
                # processes, with the stop flag). A checkpoint is saved only after its steps were read as finite.
                values, stop_now = checkpoints.agree(accelerator, [v for u in unread for v in u[2:]],
                                                     stopper.requested)
                for (step, lr, _, _), loss_value, norm in zip(unread, values[::2], values[1::2]):
                    if not math.isfinite(loss_value):
                        return nan_stop("loss", loss_value, step)
                    if not math.isfinite(norm) and accelerator.scaler is None:  # fp16's scaler skips those steps
                        return nan_stop("gradient norm", norm, step)
                    accelerator.log({"loss": loss_value, "lr": lr}, step=step)
                    loss_history.append((step, loss_value))
                progress.set_postfix(loss=loss_history[-1][1], lr=unread[-1][1])
                unread = []
                if checkpoint_due or stop_now:
                    path = checkpoints.save_checkpoint(accelerator, args.output_dir, position.step,
                                                       checkpoints.lora_settings(args), args.checkpoints_total_limit,
                                                       checkpoint_bytes)
                    if stop_now:
                        say(f"stopped by signal at step {position.step}; checkpoint saved to {path}\n"
                            f"resume with the same command plus --resume_from_checkpoint latest")
                        accelerator.end_training()
                        return 128 + stopper.requested
                if validation_due and accelerator.is_main_process:
                    sample_validation(position.step)
                stats.pause_done()  # checkpoint and validation time is not step time
            if position.step >= max_train_steps:
                break
        if position.step >= max_train_steps:
            break
        if args.validation_prompt and args.validation_epochs and (epoch + 1) % args.validation_epochs == 0 \
                and accelerator.is_main_process:
            sample_validation(position.step)
            stats.pause_done()
    progress.close()

    # ---- outputs: LoRA weights, model card, effective config, last validation grid -----------------------
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unet_final = accelerator.unwrap_model(unet)
        te_final = accelerator.unwrap_model(text_encoder) if args.train_text_encoder else None
        check_free_space(args.output_dir, lora_bytes, "the LoRA weights")
        lora_io.save_diffusers_lora(args.output_dir, unet_final, te_final)
        if args.output_format in ("kohya", "both"):
            lora_io.save_kohya_lora(args.output_dir, unet_final, te_final, args, position.step)
        if args.validation_prompt:
            sample_validation(position.step)
        report.plot_loss(loss_history, os.path.join(args.output_dir, "loss.png"))
        stats.set(final_step=position.step)  # also how a later --resume_from_checkpoint knows the run finished
        stats.write(os.path.join(args.output_dir, "train_stats.json"))
        report.write_run_files(args, position.step, progress.format_dict.get("elapsed", 0))
        accelerator.print(f"done: {position.step} steps; LoRA weights in {args.output_dir}/{lora_io.LORA_WEIGHT_NAME}")
    accelerator.end_training()
    if args.push_to_hub and accelerator.is_main_process:
        from dreambooth.hub import upload_run
        extra = [args.logging_dir.rstrip("/") + "/"] if not os.path.isabs(args.logging_dir) else []
        uploaded, message = upload_run(args.output_dir, args._hub_repo_id, args.hub_token, extra_ignore=extra)
        print(message, file=sys.stderr if not uploaded else sys.stdout)
        if not uploaded:
            return 4  # trained and saved, but the asked-for upload did not happen: scripts should notice
    return 0


if __name__ == "__main__":
    sys.exit(main())
