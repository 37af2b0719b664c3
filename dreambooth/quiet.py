"""Library quieting: our progress bar and one settings line are the output, not the libraries' chatter.
Shared by the trainer, infer.py and the examples (which must not import the training script)."""
import logging
import warnings


def quiet_libraries():
    """Call it before importing pipelines: some notices are printed at import time."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # CPU-kernel notices at import are not ours
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
