"""Checkpoints, resume and signals.

A checkpoint is accelerate's state (optimizer, lr schedule, RNG states, dataloader position) plus a
pytorch_lora_weights.safetensors that load_lora_weights reads directly. It is written to
checkpoint-N.tmp and renamed when complete, and older checkpoints are removed only after that,
so a crash mid-save never costs the previous good checkpoint.
"""
import json
import os
import re
import shutil
import signal
import sys
import zipfile

from .errors import UsageError
from .files import check_free_space, sniff_weights_file, write_text
from .lora_io import LORA_WEIGHT_NAME

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
SETTINGS_NAME = "lora_settings.json"
# What accelerate's save_state writes for our run (the LoRA weights go through our hook instead of model.safetensors).
STATE_FILES = ("optimizer.bin", "scheduler.bin", "custom_checkpoint_0.pkl", "random_states_0.pkl")


def list_checkpoints(output_dir):
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (m := CHECKPOINT.match(n)) and os.path.isdir(os.path.join(output_dir, n))]
    return [path for _, path in sorted(found)]


def latest(output_dir):
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def checkpoint_step(path):
    return int(CHECKPOINT.match(os.path.basename(os.path.normpath(path))).group(1))


def lora_settings(args):
    """The flags that decide the shape of the LoRA and what trains: a checkpoint only fits a run with the same."""
    return {"rank": args.rank, "lora_alpha": args.lora_alpha or args.rank, "use_dora": bool(args.use_dora),
            "lora_target_modules": ",".join(sorted(m.strip() for m in args.lora_target_modules.split(",") if m.strip())),
            "train_text_encoder": bool(args.train_text_encoder), **_training_settings(args)}


def _training_settings(args):
    """What else a checkpoint's state only fits: the optimizer (its state's layout), the new tokens, the EMA."""
    out = {"optimizer": getattr(args, "optimizer", None) or "adamw",
           "train_text_encoder_ti": bool(getattr(args, "train_text_encoder_ti", False)),
           "use_ema": bool(getattr(args, "use_ema", False)),  # the EMA's state is one more file of the checkpoint
           # the RNG states and the data order come back from the checkpoint: another seed could not take effect
           "seed": getattr(args, "seed", None)}
    if out["train_text_encoder_ti"]:
        out.update(token_abstraction=args.token_abstraction,
                   num_new_tokens_per_abstraction=args.num_new_tokens_per_abstraction)
    return out


def _flag_text(flag, value):
    if isinstance(value, bool):
        return f"--{flag}" if value else f"no --{flag}"
    return f"--{flag} {value}"


def checkpoint_problem(path, embeddings=False):
    """Why a checkpoint folder cannot be resumed from (missing, empty or truncated files, non-finite LoRA weights),
    or None. Reads file headers, zip directories and the LoRA file (megabytes): cheap enough to run before the model
    loads. embeddings: a pivotal run's
    checkpoint, which holds its new tokens' rows too (*_emb.safetensors)."""
    for name in STATE_FILES + (LORA_WEIGHT_NAME,):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} is missing"
        if os.path.getsize(file) == 0:
            return f"{name} is empty"
    problem = sniff_weights_file(os.path.join(path, LORA_WEIGHT_NAME))
    if problem:
        return f"{LORA_WEIGHT_NAME} {problem}"
    if not weights_are_finite(os.path.join(path, LORA_WEIGHT_NAME)):
        return f"{LORA_WEIGHT_NAME} holds NaN or infinite weights"
    if os.path.isfile(os.path.join(path, SETTINGS_NAME)) and _read_json(os.path.join(path, SETTINGS_NAME)) is None:
        return f"{SETTINGS_NAME} is not readable JSON"
    for name in ("optimizer.bin", "scheduler.bin"):  # torch.save writes zip archives: a cut file has no directory
        if not zipfile.is_zipfile(os.path.join(path, name)):
            return f"{name} is truncated or not a torch file"
    if embeddings:
        from .pivotal import find_embedding_file
        found = find_embedding_file(path)
        if found is None:
            return "the new tokens' embeddings file, *_emb.safetensors, is missing"
        problem = sniff_weights_file(found)
        if problem:
            return f"{os.path.basename(found)} {problem}"
    return None


def weights_are_finite(file):
    """Every tensor of a LoRA file is finite: a checkpoint is 'good' by its weights, not only by the losses read
    before it. Reads the file (megabytes: the LoRA alone), so it costs a fraction of a second."""
    import torch
    from safetensors.torch import load_file
    try:
        return all(bool(torch.isfinite(t).all()) for t in load_file(file).values())
    except Exception:  # unreadable: sniff_weights_file reports it
        return True


def latest_good(output_dir):
    """The newest checkpoint that can be resumed and holds finite weights, or None."""
    good = [p for p in list_checkpoints(output_dir) if not checkpoint_problem(p)]
    return good[-1] if good else None


# The optimizer settings a flag decides (learning rates, betas, weight decay, eps, Prodigy's options): a checkpoint's
# optimizer state brings its own back, and a resumed run must use what the command line says instead. The optimizer's
# learned state (moments, Prodigy's d) stays the checkpoint's.
FLAG_DECIDED = ("initial_lr", "betas", "weight_decay", "eps", "beta3", "decouple", "use_bias_correction",
                "safeguard_warmup")


def flag_settings(optimizer):
    """What this run's flags made of each parameter group, read before a checkpoint overwrites it."""
    return [{k: group[k] for k in FLAG_DECIDED if k in group} for group in optimizer.param_groups]


def apply_flag_settings(optimizer, lr_scheduler, settings):
    """After load_state: every group takes this run's flag-decided settings back, the schedule this run's base
    rates, and the current rate is recomputed at the resumed step (LambdaLR's own formula, so an unchanged
    command resumes bit-exact). Returns [(group index, key, checkpoint's value, this run's value)] that changed."""
    changed = []
    for i, (group, ours) in enumerate(zip(optimizer.param_groups, settings)):
        for key, value in ours.items():
            if group.get(key) != value:
                changed.append((i, key, group.get(key), value))
                group[key] = value
    scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps it
    if hasattr(scheduler, "lr_lambdas") and all("initial_lr" in s for s in settings):
        scheduler.base_lrs = [s["initial_lr"] for s in settings]
        rates = [base * rule(scheduler.last_epoch) for base, rule in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
        for group, rate in zip(optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = rates
    return changed


def previous_checkpoint_offer(path, embeddings=False):
    """The fix to print with a checkpoint that cannot be resumed: the latest usable one before it, if any."""
    earlier = [p for p in list_checkpoints(os.path.dirname(os.path.abspath(path)))
               if checkpoint_step(p) < checkpoint_step(path) and not checkpoint_problem(p, embeddings)]
    return (f"resume from the previous one: --resume_from_checkpoint {earlier[-1]}" if earlier else
            "no earlier checkpoint is usable; start again without --resume_from_checkpoint")


def _read_json(path):
    """A small JSON file we wrote, or None when it is unreadable (cut short by a crash, edited by hand)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def check_resume(args):
    """Resolve --resume_from_checkpoint before any model loads and refuse what cannot work: 'latest' (none yet:
    start fresh, as diffusers does), a bare 'checkpoint-N' inside output_dir (diffusers' reading) or a path."""
    value, output_dir = args.resume_from_checkpoint, args.output_dir
    if not value:
        return None
    if value == "latest":
        path = latest(output_dir)
        if path is None:
            print(f"note: --resume_from_checkpoint latest: no checkpoint in {output_dir}, starting fresh",
                  file=sys.stderr)
            return None
    elif os.path.isdir(value):
        path = value
    elif os.sep not in value and os.path.isdir(os.path.join(output_dir, value)):
        path = os.path.join(output_dir, value)
    else:
        raise UsageError(f"--resume_from_checkpoint {value}: folder does not exist (nor in --output_dir "
                         f"{output_dir}); use 'latest', a checkpoint-N name or an output_dir/checkpoint-N path")
    if not CHECKPOINT.match(os.path.basename(os.path.normpath(path))):
        raise UsageError(f"--resume_from_checkpoint {value}: not a checkpoint-N folder")
    settings_file = os.path.join(path, SETTINGS_NAME)
    saved = _read_json(settings_file) if os.path.isfile(settings_file) else None
    # a pivotal run resumes its new tokens' rows too; a checkpoint saved without them is told apart below
    embeddings = (bool(getattr(args, "train_text_encoder_ti", False))
                  and (saved or {}).get("train_text_encoder_ti", True))
    problem = checkpoint_problem(path, embeddings)
    if problem:
        raise UsageError(f"--resume_from_checkpoint {path} is corrupt or incomplete ({problem}); "
                         f"{previous_checkpoint_offer(path, embeddings)}")
    if os.path.isfile(settings_file):
        ours = lora_settings(args)
        differ = [k for k in ours if k in saved and saved[k] != ours[k]]
        if differ:
            raise UsageError(f"--resume_from_checkpoint {path} was saved with "
                             f"{', '.join(_flag_text(k, saved[k]) for k in differ)}; this run has "
                             f"{', '.join(_flag_text(k, ours[k]) for k in differ)}: use the same flags to resume, or "
                             "start a new run in another --output_dir")
    check_resume_step(path, args.max_train_steps)
    stats_file = os.path.join(output_dir, "train_stats.json")  # written last by a run that finished
    if args.max_train_steps and os.path.isfile(stats_file):
        final_step = (_read_json(stats_file) or {}).get("final_step")  # unreadable: not known to be finished
        if final_step is not None and final_step >= args.max_train_steps:
            raise UsageError(f"--resume_from_checkpoint {value}: the run in {output_dir} already finished at step "
                             f"{final_step} (--max_train_steps {args.max_train_steps}); raise --max_train_steps to "
                             "train further")
    return path


def check_resume_step(path, max_train_steps):
    """A checkpoint at or past the run's end: nothing to train (said, not silently trained past)."""
    if max_train_steps is None:
        return
    step = checkpoint_step(path)
    if step > max_train_steps:
        raise UsageError(f"--resume_from_checkpoint {path} is at step {step}, past --max_train_steps "
                         f"{max_train_steps}; raise --max_train_steps to train on, or resume an earlier checkpoint")
    if step == max_train_steps:
        raise UsageError(f"--resume_from_checkpoint {path} is already at --max_train_steps {max_train_steps}: the "
                         "run is finished; raise --max_train_steps to train further")


def is_our_checkpoint(path):
    """A checkpoint-N folder this trainer wrote: it always writes lora_settings.json, and accelerate's state files
    with our loop position (custom_checkpoint_0.pkl). Only these are ever replaced or pruned."""
    return os.path.isdir(path) and (os.path.isfile(os.path.join(path, SETTINGS_NAME))
                                    or all(os.path.isfile(os.path.join(path, n)) for n in STATE_FILES))


def save_checkpoint(accelerator, output_dir, step, settings, total_limit=None, needed_bytes=0):
    """Raises UsageError (with the numbers) when the disk cannot hold it; the previous checkpoint stays."""
    check_free_space(output_dir, needed_bytes, f"checkpoint-{step}")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = final + ".tmp"
    for path in (staging, final):  # refused up front (outputs.check_foreign_files); one copied in since, too
        if accelerator.is_main_process and os.path.isdir(path) and not is_our_checkpoint(path):
            raise UsageError(f"--output_dir {output_dir}: {os.path.basename(path)}/ was not written by this trainer "
                             "and the run's checkpoint takes its name; move it out of the folder")
    if accelerator.is_main_process and os.path.isdir(staging):
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)  # every rank saves its own RNG state; the LoRA hook writes on rank 0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_text(os.path.join(staging, SETTINGS_NAME), json.dumps(settings, indent=2))
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit:
            for old in [p for p in list_checkpoints(output_dir) if is_our_checkpoint(p)][:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path):
    """accelerate's load_state, with what it raises about the files turned into one line that offers the
    previous checkpoint (check_resume already caught missing and truncated files; this catches the rest)."""
    try:
        accelerator.load_state(path)
    except Exception as e:
        from .errors import first_line
        raise UsageError(f"--resume_from_checkpoint {path}: cannot load it ({type(e).__name__}: {first_line(e)}); "
                         f"{previous_checkpoint_offer(path)}") from e


def register_lora_state_hooks(accelerator, family, denoiser, text_encoders=(), save_kohya=None, pivotal=None,
                              embedding_name=None):
    """save_state writes only the LoRA weights (megabytes, in the loadable diffusers file) instead
    of the whole denoiser, and with pivotal tuning the new token rows (<name>_emb.safetensors, loadable as the final
    one is); load_state puts them back into the live adapters and rows. save_kohya(folder), when the output
    format includes it, also writes the kohya file there: UI users try intermediate steps too."""
    from .lora_io import save_diffusers_lora

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_diffusers_lora(output_dir, family, accelerator.unwrap_model(denoiser),
                                [accelerator.unwrap_model(e) for e in text_encoders],
                                pivotal.lora_metadata(embedding_name) if pivotal is not None else None)
            if save_kohya:
                save_kohya(output_dir)
            if pivotal is not None:
                pivotal.save(os.path.join(output_dir, embedding_name))
        weights.clear()

    def load_hook(models, input_dir):
        load_lora_into(input_dir, family, accelerator.unwrap_model(denoiser),
                       [accelerator.unwrap_model(e) for e in text_encoders])
        if pivotal is not None:
            from .pivotal import find_embedding_file
            path = find_embedding_file(input_dir)
            if path is None:
                raise FileNotFoundError(f"no *_emb.safetensors (the new token embeddings) in {input_dir}")
            pivotal.load(path)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_lora_into(folder, family, denoiser, text_encoders=()):
    """Inverse of lora_io.save_diffusers_lora, for resuming: every saved tensor must find its place."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, LORA_WEIGHT_NAME))

    def text_encoder_convert(encoder):
        def convert(sd):
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
            if not hasattr(encoder, "text_model"):  # transformers 5 CLIPTextModel: no text_model level
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
            return sd
        return convert

    parts = [(f"{family.denoiser_name}.", denoiser, convert_unet_state_dict_to_peft)]  # peft names stay as they are
    parts += [(f"{name}.", encoder, text_encoder_convert(encoder))
              for name, encoder in zip(family.text_encoder_names, text_encoders)]
    for prefix, model, convert in parts:
        if not getattr(model, "peft_config", None):  # a text encoder that trains only new token rows
            continue
        sd = convert({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
        result = set_peft_model_state_dict(model, sd, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{folder}: {len(unexpected)} LoRA tensors did not match the model, e.g. {unexpected[0]}")


class RunPosition:
    """Where the loop is: optimizer steps, epoch, batches consumed in that epoch. Saved with every
    checkpoint (accelerate's register_for_checkpointing) because the batch position cannot be derived
    from the step count: accumulation windows do not restart at epoch boundaries."""

    def __init__(self):
        self.step, self.epoch, self.batches = 0, 0, 0

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "batches": self.batches}

    def load_state_dict(self, state):
        self.step, self.epoch, self.batches = state["step"], state["epoch"], state["batches"]


def launched_by_simple_accelerate_launcher():
    """`accelerate launch` with one process runs us as a plain child and does not pass signals on: a scheduler's
    SIGTERM kills the launcher and leaves us running, unsaved, until the SIGKILL. It sets ACCELERATE_* variables
    for us; torchrun (several processes) sets TORCHELASTIC_RUN_ID and forwards SIGTERM itself."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ and "TORCHELASTIC_RUN_ID" not in os.environ


def term_when_parent_dies():
    """Ask the kernel (Linux prctl PR_SET_PDEATHSIG) for a SIGTERM when our parent exits, so the launcher's
    death reaches us as the signal it got. Only under the launcher: a `nohup python ... &` run must outlive its
    shell. False where it is not available."""
    if not sys.platform.startswith("linux") or not launched_by_simple_accelerate_launcher():
        return False
    import ctypes
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGTERM, 0, 0, 0) != 0:  # 1 = PR_SET_PDEATHSIG
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent:  # the launcher died before the request was in place
        os.kill(os.getpid(), signal.SIGTERM)
    return True


class GracefulStop:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit non-zero. Second: exit at once."""

    def __init__(self):
        self.requested = 0
        self.parent = os.getppid()
        # what the first signal makes the run do, as the acknowledgement says it: the loop finishes the step and
        # checkpoints; after the last step the outputs say what they do instead (finish())
        self.then = "finishing this step and saving a checkpoint"
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested and os.getppid() != self.parent:
            return  # the launcher died of the same Ctrl-C (its SIGTERM echo from term_when_parent_dies): not a second
        if self.requested:
            print(f"\nsecond signal ({signal.Signals(signum).name}): exiting now without saving", file=sys.stderr)
            os._exit(128 + signum)
        self.requested = signum
        print(f"\n{signal.Signals(signum).name} received: {self.then} (send it again to exit at once)",
              file=sys.stderr, flush=True)


def agree(accelerator, values, stop_requested):
    """(values as floats, stop requested) with one host sync; across processes each value is averaged (NaN on
    any rank makes it NaN everywhere) and a stop on any rank stops all, so they skip or stop together."""
    import torch
    flags = torch.stack([v.detach().float() for v in values] +
                        [torch.tensor(float(bool(stop_requested)), device=values[0].device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
        flags[:-1] /= accelerator.num_processes
    *floats, stop = flags.tolist()
    return floats, stop > 0
