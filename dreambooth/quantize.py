"""A quantized frozen base (QLoRA): the denoiser's linear layers (and, with --quantize_text_encoders, the text
encoders that do not train) are stored in 4-bit NF4 or 8-bit by bitsandbytes as they load; the LoRA (peft) trains
on top in full precision. Only the LoRA is saved, so the files are the same as from an unquantized base.

    --quantize_base nf4 | int8               the common cases
    --bnb_quantization_config_path FILE      diffusers' flag: a JSON of BitsAndBytesConfig fields

Loading goes through the libraries' own quantizers (diffusers' for the denoiser, transformers' for the text
encoders), which read the weights file tensor by tensor. Three things of ours, and why:
- diffusers' bitsandbytes quantizer refuses to run without a GPU ("A GPU is needed for quantization"), although
  bitsandbytes >= 0.49 quantizes and computes on the CPU. On a machine without CUDA we skip that one check and
  place the weights on the CPU (device_map); with CUDA the library runs unchanged.
- bitsandbytes' 4-bit layers take a CPU fast path in inference (AVX512-BF16 machines) that repacks the weights in
  place and fails for layers narrower than its 64-value blocks; we turn that path off (sampling on the CPU is a
  little slower; training never takes it).
- The weights file is read through a mapping whose pages stay resident until the whole load ends; for the
  denoiser the pages each weight was read from are dropped once it is quantized (_dropping_read_weights), so the
  full-precision model is never resident as a whole, and what the quantizer left as views of the file is copied
  after the load (_own_memory).
"""
import contextlib
import json
import os

from . import resident
from .errors import UsageError

# The timestep / pooled-text embedding MLPs and the last modulation stay in the compute precision: a fraction of a
# percent of the weights (SD 1.5: 2 M of 860 M), and the layers every output depends on. Measured on the toy base's
# UNet: NF4 everywhere moves its output by 18% (relative L2 on random inputs), NF4 with these kept by 13%.
KEEP = ["time_embedding", "add_embedding", "time_text_embed", "norm_out"]
PRESETS = {
    # NF4 with double quantization: QLoRA's (Dettmers et al. 2023) and diffusers' / SimpleTuner's usual settings;
    # the compute dtype follows --mixed_precision at load time
    "nf4": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": True,
            "llm_int8_skip_modules": KEEP},
    "int8": {"load_in_8bit": True, "llm_int8_skip_modules": KEEP},
}
CONFIG_FIELDS = {"load_in_4bit", "load_in_8bit", "bnb_4bit_quant_type", "bnb_4bit_use_double_quant",
                 "bnb_4bit_compute_dtype", "bnb_4bit_quant_storage", "llm_int8_threshold", "llm_int8_skip_modules",
                 "llm_int8_has_fp16_weight", "llm_int8_enable_fp32_cpu_offload", "quant_method"}


def _read_config(path):
    flag = "--bnb_quantization_config_path"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot read it ({e.strerror or e})") from e
    except ValueError as e:
        raise UsageError(f"{flag} {path}: not JSON ({e}); write BitsAndBytesConfig fields, e.g. "
                         '{"load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}') from e
    if not isinstance(data, dict):
        raise UsageError(f"{flag} {path}: expected a JSON object of BitsAndBytesConfig fields")
    unknown = sorted(set(data) - CONFIG_FIELDS)
    if unknown:
        raise UsageError(f"{flag} {path}: {unknown[0]} is not a BitsAndBytesConfig field (fields: "
                         f"{', '.join(sorted(CONFIG_FIELDS - {'quant_method'}))})")
    if bool(data.get("load_in_4bit")) == bool(data.get("load_in_8bit")):
        raise UsageError(f"{flag} {path}: set exactly one of load_in_4bit and load_in_8bit to true")
    if data.get("bnb_4bit_quant_type", "nf4") not in ("nf4", "fp4"):
        raise UsageError(f"{flag} {path}: bnb_4bit_quant_type must be nf4 or fp4 (got {data['bnb_4bit_quant_type']!r})")
    data.pop("quant_method", None)
    return data


def settings(args):
    """The BitsAndBytesConfig fields the flags ask for, or None (no quantization). Checked before any model loads:
    the package, the file, the combinations."""
    preset, path = getattr(args, "quantize_base", None), getattr(args, "bnb_quantization_config_path", None)
    if not preset and not path:
        if getattr(args, "quantize_text_encoders", False):
            raise UsageError("--quantize_text_encoders needs --quantize_base (or --bnb_quantization_config_path)")
        return None
    if preset and path:
        raise UsageError("--quantize_base and --bnb_quantization_config_path both say how to quantize; give one")
    import importlib.util
    if importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError(f"{'--quantize_base' if preset else '--bnb_quantization_config_path'} needs bitsandbytes: "
                         "pip install bitsandbytes")
    fields = {k: (list(v) if isinstance(v, list) else v) for k, v in PRESETS[preset].items()} if preset \
        else _read_config(path)
    model = str(args.pretrained_model_name_or_path or "")
    if os.path.isfile(model):
        raise UsageError(f"--pretrained_model_name_or_path {model}: a quantized base loads from a diffusers folder or "
                         "hub id (its weights are read tensor by tensor); convert the single file first, or drop "
                         "--quantize_base")
    if fields.get("load_in_8bit"):
        import torch
        if torch.backends.mps.is_available() and not torch.cuda.is_available():
            raise UsageError("--quantize_base int8: bitsandbytes has no 8-bit kernels for Apple MPS; use nf4")
    return fields


def describe(fields):
    if fields is None:
        return "off"
    if fields.get("load_in_8bit"):
        return "int8"
    return fields.get("bnb_4bit_quant_type", "nf4") + (" (double quant)" if fields.get("bnb_4bit_use_double_quant") else "")


@contextlib.contextmanager
def _cpu_quantization():
    """diffusers' bitsandbytes quantizers without their GPU-only check, for this block (see the module's note)."""
    import torch
    if torch.cuda.is_available():
        yield
        return
    from diffusers.quantizers.bitsandbytes import bnb_quantizer
    classes = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    saved = [cls.validate_environment for cls in classes]
    for cls in classes:
        cls.validate_environment = lambda self, *a, **k: None
    try:
        yield
    finally:
        for cls, original in zip(classes, saved):
            cls.validate_environment = original


@contextlib.contextmanager
def _dropping_read_weights():
    """diffusers' bitsandbytes quantizers, for this block, drop the pages of the weights file each weight was read
    from once it is quantized (resident.drop_read_pages). Otherwise every page read stays resident until the whole
    file is let go (it stays mapped while any tensor read from it is alive: the norms and biases kept as they are),
    and the load peaks at the full-precision model's size plus the quantized one's (measured: 3.6 GB for a
    0.64B-parameter transformer whose 4-bit weights take 0.35 GB). A weight kept as read (a bias) or used as it
    is (an already quantized checkpoint) keeps its pages."""
    import bitsandbytes as bnb
    from diffusers.quantizers.bitsandbytes import bnb_quantizer
    classes = (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer)
    saved = [cls.create_quantized_param for cls in classes]

    def dropping(original):
        def create_quantized_param(self, model, param_value, param_name, *args, **kwargs):
            result = original(self, model, param_value, param_name, *args, **kwargs)
            owner, _, name = param_name.rpartition(".")
            stored = model.get_submodule(owner)._parameters.get(name)
            if (param_value is not None and isinstance(stored, (bnb.nn.Params4bit, bnb.nn.Int8Params))
                    and stored.data_ptr() != param_value.data_ptr()):
                resident.drop_read_pages(param_value)
            return result
        return create_quantized_param
    for cls, original in zip(classes, saved):
        cls.create_quantized_param = dropping(original)
    try:
        yield
    finally:
        for cls, original in zip(classes, saved):
            cls.create_quantized_param = original


def _compute_dtype(fields, dtype):
    import torch
    named = fields.get("bnb_4bit_compute_dtype")
    return getattr(torch, named) if isinstance(named, str) else (named or dtype)


def load_quantized(loader, fields, dtype, device, library):
    """loader(**kwargs) with the library's BitsAndBytesConfig ("diffusers" or "transformers") and the weights
    placed on `device` as they are quantized."""
    import importlib
    config_class = importlib.import_module(library).BitsAndBytesConfig
    options = dict(fields, bnb_4bit_compute_dtype=_compute_dtype(fields, dtype)) if fields.get("load_in_4bit") \
        else dict(fields)
    kwargs = {"quantization_config": config_class(**options), "device_map": {"": str(device)}}
    with contextlib.ExitStack() as stack:
        if library == "diffusers":
            stack.enter_context(_cpu_quantization())
            stack.enter_context(_dropping_read_weights())
        module = loader(**kwargs)
    return cpu_ready(_own_memory(module))


def _own_memory(module):
    """The tensors the quantizer left as they were read (norms, biases, embeddings, convolutions) can be views of
    the memory-mapped weights file, which keeps the whole file mapped: on the CPU every page of it stays in this
    process's resident memory (measured: 2.4 GB for a 0.6B-parameter transformer whose 4-bit weights take 0.35 GB).
    A copy of those tensors lets the mapping go; then the C heap gives back what loading freed (Linux)."""
    import bitsandbytes as bnb
    for layer in module.modules():
        for name, param in layer._parameters.items():
            if param is not None and not isinstance(param, (bnb.nn.Params4bit, bnb.nn.Int8Params)):
                param.data = param.data.clone()
        for name, buffer in layer._buffers.items():
            if buffer is not None:
                layer._buffers[name] = buffer.clone()
    import gc
    gc.collect()
    resident.trim()
    return module


def cpu_ready(module):
    """Turns off bitsandbytes' in-place CPU repacking of 4-bit weights (see the module's note)."""
    import bitsandbytes as bnb
    for layer in module.modules():
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return module


def is_quantized(module):
    return bool(getattr(module, "is_quantized", False) or getattr(module, "is_loaded_in_4bit", False)
                or getattr(module, "is_loaded_in_8bit", False))
