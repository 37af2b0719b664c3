#!/usr/bin/env python
"""Score a DreamBooth LoRA with the DreamBooth paper's protocol (arXiv 2208.12242, section 4.1).

The paper's 25 prompts (objects list, or live-subjects list for animals), --num_images images per prompt with
fixed seeds, compared with the real photos of the subject:
  DINO, CLIP-I  subject fidelity (higher is better)      CLIP-T  prompt fidelity (higher is better)
  PRES          class images' similarity to the subject (lower is better: the class is preserved)
  DIV           diversity among the images of one prompt (higher is better)
Writes metrics.json (every number, per prompt too) and contact_sheet_<model>.png to --output and prints the
paper's table. --checkpoints scores every checkpoint-N of a run, one row each, to pick the step that balances
subject fidelity against prompt fidelity.

example:
  python evaluate.py --base stable-diffusion-v1-5/stable-diffusion-v1-5 --lora work_dirs/sd15_dog \\
    --real_dir ./dog --class_name dog --checkpoints --with_base --output work_dirs/sd15_dog/eval
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from dreambooth.config import OneLineParser, finite_float, seed_int  # noqa: E402  (no torch: --help stays instant)
from dreambooth.devices import check_device_name, pick_device  # noqa: E402
from dreambooth.errors import UsageError, run_cli  # noqa: E402


def build_parser():
    p = OneLineParser(prog="evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="Base model: hub id, diffusers folder or single .safetensors file.")
    p.add_argument("--lora", default=None,
                   help="The LoRA: a training output folder, a checkpoint-N folder or a .safetensors file "
                        "(without it the base model alone is scored).")
    p.add_argument("--checkpoints", action="store_true",
                   help="Score every checkpoint-N in the --lora output folder and its final LoRA, one table row each.")
    p.add_argument("--with_base", action="store_true", help="Also score the base model (a row for comparison).")
    p.add_argument("--real_dir", required=True, help="Folder of real photos of the subject (the training photos).")
    p.add_argument("--class_name", required=True, help="Class noun, as in the class prompt: dog, backpack, circle.")
    p.add_argument("--identifier", default="sks",
                   help="The identifier word of the instance prompt (a pivotal-tuning run's --token_abstraction word, "
                        "e.g. TOK: its trained tokens are loaded with the LoRA and put in its place).")
    p.add_argument("--prompt_set", default="auto", choices=["auto", "object", "live"],
                   help="The paper's object or live-subject prompt list; auto: live for animals and people.")
    p.add_argument("--class_prompt", default=None, help="Prompt of the PRES images (default: 'a <class_name>').")
    p.add_argument("--num_images", type=int, default=4, help="Images per prompt (the paper: 4).")
    p.add_argument("--num_class_images", type=int, default=8,
                   help="Class-prompt images for PRES (0 leaves PRES out).")
    p.add_argument("--num_prompts", type=int, default=None,
                   help="Use only the first N of the 25 prompts (a quick look; the paper's numbers use all 25).")
    p.add_argument("--seed", type=seed_int, default=0, help="Image k of every prompt uses seed + k (0..2**32-1).")
    p.add_argument("--steps", type=int, default=None,
                   help="Sampler steps per image (default: the family's, as infer.py: 30 DPM-Solver++ steps for SD 1.x/"
                        "2.x and SDXL, 28 for SD 3 and Flux.1-dev, 4 for schnell).")
    p.add_argument("--guidance_scale", type=finite_float, default=None,
                   help="Guidance scale (default: the family's: 7.5 for SD 1.x/2.x and SDXL, 7.0 for SD 3, 3.5 for "
                        "Flux.1-dev, 0 for schnell).")
    p.add_argument("--resolution", type=int, default=None,
                   help="Image side in pixels, a multiple of 8 (16 for SD 3 and Flux.1; default: the model's own).")
    p.add_argument("--batch_size", type=int, default=8, help="Images per pipeline call and per embedding batch.")
    p.add_argument("--dino_model", default="facebook/dino-vits16",
                   help="DINO ViT (hub id or folder) for DINO, PRES and DIV; the paper's is ViT-S/16.")
    p.add_argument("--clip_model", default="openai/clip-vit-base-patch32",
                   help="CLIP model (hub id or folder) for CLIP-I and CLIP-T.")
    p.add_argument("--device", default="auto",
                   help="Device for generation: auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
    p.add_argument("--eval_device", default=None, help="Device for DINO/CLIP (default: same as --device).")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                   help="Pipeline weights' precision (fp16 on a CPU runs in fp32, with a warning).")
    p.add_argument("--output", default="eval", help="Folder for metrics.json and the contact sheets.")
    p.add_argument("--no_progress", action="store_true", help="No progress bar (logs, CI).")
    p.add_argument("--debug", action="store_true", help="Full traceback on errors.")
    return p


def check(args):
    """Flags a user can get wrong, checked before any model loads."""
    for flag in ("num_images", "batch_size", "steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            raise UsageError(f"--{flag} {getattr(args, flag)}: must be at least 1")
    if args.num_class_images < 0:
        raise UsageError(f"--num_class_images {args.num_class_images}: must be 0 or more")
    if args.num_prompts is not None and not 1 <= args.num_prompts <= 25:
        raise UsageError(f"--num_prompts {args.num_prompts}: must be 1-25 (the paper has 25 prompts)")
    if not args.identifier.strip() or not args.class_name.strip():
        raise UsageError("--identifier and --class_name must not be empty")
    if args.class_prompt is not None and not args.class_prompt.strip():
        raise UsageError(f"--class_prompt is empty; leave it out for 'a {args.class_name}', or give the class "
                         "prompt the run was trained with")
    if not os.path.isdir(args.real_dir):
        raise UsageError(f"--real_dir {args.real_dir}: no such folder; point it at the real photos of the subject")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise UsageError(f"--resolution must be a multiple of 8, at least 8 (got {args.resolution}); leave it out "
                         "for the model's own size")
    check_device_name("--device", args.device)
    if args.eval_device is not None:
        check_device_name("--eval_device", args.eval_device)


def main(argv=None):
    return run_cli("evaluate.py", _main, argv)


def _main(argv):
    args = build_parser().parse_args(argv)
    check(args)
    args.device = pick_device(args.device, "--device")
    args.eval_device = pick_device(args.eval_device, "--eval_device") if args.eval_device else args.device
    if args.dtype == "fp16" and args.device == "cpu":
        print("evaluate.py: warning: --dtype fp16 on cpu is slow or unsupported; using fp32", file=sys.stderr)
        args.dtype = "fp32"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from dreambooth.quiet import quiet_libraries
    quiet_libraries()
    from dreambooth.evaluation import evaluate
    evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
