"""Checkpoints, resume and signals.

A checkpoint is accelerate's state (optimizer, lr schedule, RNG states, dataloader position) plus a
pytorch_lora_weights.safetensors that load_lora_weights reads directly. It is written to
checkpoint-N.tmp and renamed when complete, and older checkpoints are removed only after that,
so a crash mid-save never costs the previous good checkpoint.
"""
import os
import re
import shutil
import signal
import sys

import torch

from .config import UsageError, check_free_space
from .lora_io import LORA_WEIGHT_NAME

CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir):
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), os.path.join(output_dir, n)) for n in os.listdir(output_dir)
             if (m := CHECKPOINT.match(n)) and os.path.isdir(os.path.join(output_dir, n))]
    return [path for _, path in sorted(found)]


def latest(output_dir):
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(value, output_dir):
    """'latest' with no checkpoint yet starts fresh (diffusers' behaviour); a path must be a checkpoint."""
    if not value:
        return None
    if value == "latest":
        path = latest(output_dir)
        if path is None:
            print(f"note: --resume_from_checkpoint latest: no checkpoint in {output_dir}, starting fresh",
                  file=sys.stderr)
        return path
    if not CHECKPOINT.match(os.path.basename(os.path.normpath(value))):
        raise UsageError(f"--resume_from_checkpoint {value}: not a checkpoint-N folder")
    return value


def save_checkpoint(accelerator, output_dir, step, total_limit=None, needed_bytes=0):
    """Raises UsageError (with the numbers) when the disk cannot hold it; the previous checkpoint stays."""
    check_free_space(output_dir, needed_bytes, f"checkpoint-{step}")
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = final + ".tmp"
    if accelerator.is_main_process and os.path.isdir(staging):
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)  # every rank saves its own RNG state; the LoRA hook writes on rank 0
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def register_lora_state_hooks(accelerator, unet, text_encoder=None):
    """save_state writes only the LoRA weights (megabytes, in the loadable diffusers file) instead
    of the whole UNet; load_state puts them back into the live adapters."""
    from .lora_io import save_diffusers_lora

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_diffusers_lora(output_dir, accelerator.unwrap_model(unet),
                                accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
        weights.clear()

    def load_hook(models, input_dir):
        load_lora_into(input_dir, accelerator.unwrap_model(unet),
                       accelerator.unwrap_model(text_encoder) if text_encoder is not None else None)
        models.clear()

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def load_lora_into(folder, unet, text_encoder=None):
    """Inverse of lora_io.save_diffusers_lora, for resuming: every saved tensor must find its place."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(folder, LORA_WEIGHT_NAME))
    parts = [("unet.", unet, convert_unet_state_dict_to_peft)]
    if text_encoder is not None:
        def te_convert(sd):
            sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(sd))
            if not hasattr(text_encoder, "text_model"):
                sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
            return sd
        parts.append(("text_encoder.", text_encoder, te_convert))
    for prefix, model, convert in parts:
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


class GracefulStop:
    """First SIGTERM/SIGINT: finish the step, checkpoint, exit non-zero. Second: exit at once."""

    def __init__(self):
        self.requested = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.requested:
            print(f"\nsecond signal ({signal.Signals(signum).name}): exiting now without saving", file=sys.stderr)
            os._exit(128 + signum)
        self.requested = signum
        print(f"\n{signal.Signals(signum).name} received: finishing this step and saving a checkpoint "
              "(send it again to exit at once)", file=sys.stderr, flush=True)


def agree(accelerator, values, stop_requested):
    """(values as floats, stop requested) with one host sync; across processes each value is averaged (NaN on
    any rank makes it NaN everywhere) and a stop on any rank stops all, so they skip or stop together."""
    flags = torch.stack([v.detach().float() for v in values] +
                        [torch.tensor(float(bool(stop_requested)), device=values[0].device)])
    if accelerator.num_processes > 1:
        flags = accelerator.reduce(flags, reduction="sum")
        flags[:-1] /= accelerator.num_processes
    *floats, stop = flags.tolist()
    return floats, stop > 0
