"""The optimizer: AdamW, bitsandbytes' 8-bit AdamW or Prodigy (`--optimizer`, as diffusers' advanced
DreamBooth scripts name them), built over the run's parameter groups, with what each needs known up front:
its optional package, the learning rate it expects, how many bytes of state it keeps per trained parameter
(for the free-space check before a checkpoint) and the rate it really applies (Prodigy's d x lr).

Stdlib at import: the flag checks import it before torch loads.
"""
import importlib.util

from .errors import UsageError

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy")
PACKAGES = {"adamw8bit": ("bitsandbytes", "bitsandbytes"), "prodigy": ("prodigyopt", "prodigyopt")}
# Bytes of optimizer state per fp32 parameter, as saved in a checkpoint: AdamW keeps two fp32 moments; the 8-bit
# AdamW two uint8 moments plus one fp32 scale per 256-value block; Prodigy two moments plus its running sum `s`
# and the starting point `p0` (four fp32 tensors the size of the weights).
STATE_BYTES_PER_PARAM = {"adamw": 8, "adamw8bit": 2 + 8 / 256, "prodigy": 16}
PRODIGY_LOW_LR = 0.1  # below this Prodigy's own step-size estimate is throttled (it expects lr ~ 1.0)


def optimizer_name(args):
    """The chosen optimizer, lower-cased (diffusers reads --optimizer case-insensitively); --use_8bit_adam, the
    base script's flag, means adamw8bit."""
    name = (args.optimizer or "adamw").lower()
    if name not in OPTIMIZERS:
        raise UsageError(f"--optimizer {args.optimizer}: unknown optimizer; use adamw, adamw8bit or prodigy")
    if args.use_8bit_adam:
        if name == "prodigy":
            raise UsageError("--use_8bit_adam is 8-bit AdamW and --optimizer prodigy is another optimizer; "
                             "drop one of them")
        name = "adamw8bit"
    return name


def check_optimizer_flags(args, notes):
    """Before any model loads: the package is installed, and the learning rates suit the optimizer. Sets
    args.optimizer to the canonical name (what config.yaml, the card and the metadata record)."""
    name = optimizer_name(args)
    package, pip_name = PACKAGES.get(name, (None, None))
    if package and importlib.util.find_spec(package) is None:
        flag = "--use_8bit_adam" if args.use_8bit_adam else f"--optimizer {name}"
        raise UsageError(f"{flag} needs {package}, an optional package: pip install {pip_name} (or use "
                         "--optimizer adamw)")
    args.optimizer = name
    if args.prodigy_beta3 is not None and not 0 <= args.prodigy_beta3 < 1:
        raise UsageError(f"--prodigy_beta3 must be in [0, 1) (got {args.prodigy_beta3})")
    if name == "prodigy":
        if args.learning_rate <= PRODIGY_LOW_LR:
            notes.append(f"warning: --optimizer prodigy with --learning_rate {args.learning_rate}: Prodigy estimates "
                         "the step size itself and --learning_rate only scales it; use --learning_rate 1.0 "
                         "(an AdamW-sized rate makes it learn that many times slower)")
        if args.text_encoder_lr is not None and args.text_encoder_lr != args.learning_rate:
            notes.append(f"warning: --optimizer prodigy: --text_encoder_lr {args.text_encoder_lr} is ignored; Prodigy "
                         f"shares one step size across all parameter groups, so they all use --learning_rate "
                         f"{args.learning_rate}")
    return name


def state_bytes(name, num_params):
    """Bytes the optimizer's state adds to a checkpoint for num_params trained fp32 parameters."""
    return int(STATE_BYTES_PER_PARAM[name] * num_params)


def build_optimizer(name, groups, *, betas, weight_decay, eps, device_type, prodigy_beta3=None,
                    prodigy_decouple=True, prodigy_use_bias_correction=True, prodigy_safeguard_warmup=True):
    """The optimizer over `groups` (torch param-group dicts, each with its own lr and possibly weight_decay).
    Prodigy needs one lr for all groups (it raises otherwise): the caller's lr of the first group is used."""
    import torch
    if name == "adamw8bit":
        import bitsandbytes as bnb
        return bnb.optim.AdamW8bit(groups, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "prodigy":
        import contextlib
        import io
        import prodigyopt
        lr = groups[0]["lr"]
        groups = [dict(g, lr=lr) for g in groups]
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its weight-decay mode on every construction
                return prodigyopt.Prodigy(groups, lr=lr, betas=betas, beta3=prodigy_beta3, weight_decay=weight_decay,
                                      eps=eps, decouple=prodigy_decouple,
                                      use_bias_correction=prodigy_use_bias_correction,
                                      safeguard_warmup=prodigy_safeguard_warmup)
    # One fused kernel over all trained tensors instead of a Python loop over them (5x faster on CPU too).
    fused = {"fused": True} if device_type == "cuda" or (device_type == "cpu" and torch.__version__ >= "2.4") else {}
    return torch.optim.AdamW(groups, betas=betas, weight_decay=weight_decay, eps=eps, **fused)


def effective_lr(optimizer, scheduled_lr):
    """The step size the first group really gets: the schedule's lr, times Prodigy's estimate d where there is
    one (a float it keeps in the group; reading it costs no device sync)."""
    group = optimizer.param_groups[0]
    return scheduled_lr * group["d"] if "d" in group else scheduled_lr


def describe(name, optimizer):
    """kohya's ss_optimizer form: module.Class(key=value,...) of the settings that are not the default."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    cls = type(inner)
    group = inner.param_groups[0]
    keys = {"adamw": ("betas", "weight_decay", "eps"), "adamw8bit": ("betas", "weight_decay", "eps"),
            "prodigy": ("betas", "beta3", "weight_decay", "eps", "decouple", "use_bias_correction",
                        "safeguard_warmup")}[name]
    settings = ",".join(f"{k}={group[k]}" for k in keys if k in group)
    return f"{cls.__module__}.{cls.__name__}({settings})"
