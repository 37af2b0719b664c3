"""Library quieting: our progress bar and one settings line are the output, not the libraries' chatter.
Shared by the trainer, infer.py and the examples (which must not import the training script)."""
import logging
import warnings


def quiet_libraries():
    """Call it before importing pipelines: some notices are printed at import time."""
    # bitsandbytes' CPU notices ("Failed to load CPU gemm_4bit_forward from kernels-community": its optional faster
    # CPU kernels are not installed; "MatMul8bitLt: inputs will be cast ... to float16": every 8-bit step) are not
    # the user's to act on; the quantized-base line says once what the CPU costs
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import diffusers
    import transformers
    # diffusers >= 0.36 renamed torch_dtype to dtype; older releases, which requirements.txt allows, only know
    # torch_dtype, so we keep passing it and silence the rename notice.
    warnings.filterwarnings("ignore", message=".*`torch_dtype` is deprecated.*", category=FutureWarning)
    # diffusers still passes a huggingface_hub argument that is now ignored; the notice is about their code
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    import huggingface_hub
    huggingface_hub.utils.logging.set_verbosity_error()  # its "Retrying in 8s" lines: our one line says why
