"""The output folder: what a run writes into --output_dir, which of what is already there a run of ours wrote,
and the checks that keep a run from deleting, replacing or training on anything else.

Users point --output_dir at folders that hold other things: a UI's LoRA folder full of other LoRAs and
embeddings, a project folder with its README.md. So a run replaces only files it can tell are a run's of ours
(by their content: our marker in the card, the recipe and the safetensors headers; our settings file in a
checkpoint), refuses up front where it would replace anything else, and --overwrite_output_dir removes only the
previous run's own files. A lock on the folder keeps a second run out while one trains in it; the kernel drops it
when the process ends, however it ends, so nothing is left to clean up after a crash or a kill -9.

Stdlib at import: the flag checks use it before torch loads.
"""
import json
import os
import re
import shutil

from .checkpoints import CHECKPOINT, is_our_checkpoint
from .errors import UsageError
from .files import safetensors_metadata, sniff_weights_file, writable_folder_problem
from .lora_io import LORA_WEIGHT_NAME
from .pivotal import EMB_SUFFIX, TOKENS_METADATA

try:
    import fcntl
except ImportError:  # Windows: no advisory locks on folders; runs are not guarded there
    fcntl = None

LOSS_PLOT, STATS, RECIPE, CARD = "loss.png", "train_stats.json", "config.yaml", "README.md"
VALIDATION = "validation"
CLASS_IMAGES = "class_images"  # the default --class_data_dir inside output_dir
GRID = re.compile(r"^step-\d{6,}\.png$")  # validation grids, validation/step-000500.png
RECIPE_MARKER = "# train_dreambooth_lora.py run recipe"  # config.yaml's first line
CARD_MARKER = "train_dreambooth_lora.py"  # every card we write shows the command that made it
KOHYA_MARKER = "dreambooth_lora_version"  # a header key of our kohya files (kohya_metadata.build)


def run_name(output_dir):
    """The name the UI files take: <output_dir's name>.safetensors and <name>_emb.safetensors."""
    return os.path.basename(os.path.normpath(os.path.abspath(output_dir))) or "lora"


def final_files(output_dir, output_format, embeddings):
    """{name: what it is} for the files a run writes at the top of output_dir when it finishes (embeddings: a
    pivotal run's token file)."""
    name = run_name(output_dir)
    out = {LORA_WEIGHT_NAME: "LoRA weights"}
    if output_format in ("kohya", "both"):
        out[name + ".safetensors"] = "kohya-format LoRA"
    if embeddings:
        out[name + EMB_SUFFIX] = "token embeddings"
    out.update({LOSS_PLOT: "loss plot", STATS: "run statistics", RECIPE: "run recipe", CARD: "model card"})
    return out


# ---- whose is it ----------------------------------------------------------------------------------------------
def _head(path, size=1 << 20):
    try:
        with open(path, "rb") as f:
            return f.read(size).decode("utf-8", "replace")
    except OSError:
        return ""


def _our_recipe(path):
    text = _head(path)
    if text.startswith(RECIPE_MARKER):
        return True
    try:  # written before the marker: every flag of the trainer, dozens of keys
        import yaml
        data = yaml.safe_load(text)
    except Exception:
        return False
    return isinstance(data, dict) and len(data) >= 40 and {"pretrained_model_name_or_path", "instance_prompt",
                                                           "output_dir", "rank"} <= set(data)


def _our_stats(path):
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and ("final_step" in data or "steps_timed" in data)


def holds_our_run(folder):
    """The folder has the files of a finished run (ours, or another trainer's diffusers LoRA that
    --overwrite_output_dir was asked to replace), or what a run of ours wrote at its end."""
    return (os.path.isfile(os.path.join(folder, LORA_WEIGHT_NAME)) or _our_stats(os.path.join(folder, STATS))
            or _our_recipe(os.path.join(folder, RECIPE)) or CARD_MARKER in _head(os.path.join(folder, CARD)))


def is_ours(folder, name):
    """Whether the file `name` in output_dir was written by a run of ours, by what it holds (the loss plot, which
    says nothing about itself, by the run files beside it). pytorch_lora_weights.safetensors is the finished run
    itself: the 'already holds a finished run' check and --overwrite_output_dir decide about it."""
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return False
    if name == LORA_WEIGHT_NAME:  # any real LoRA file there (another trainer's too) is a finished run to replace,
        # and so is whatever sits beside our run's own stats or card; a lone file that is not safetensors is not one
        return (sniff_weights_file(path) is None or _our_stats(os.path.join(folder, STATS))
                or CARD_MARKER in _head(os.path.join(folder, CARD)))
    if name == CARD:
        return CARD_MARKER in _head(path)
    if name == RECIPE:
        return _our_recipe(path)
    if name == STATS:
        return _our_stats(path)
    if name.endswith(EMB_SUFFIX):
        return TOKENS_METADATA in safetensors_metadata(path)
    if name.endswith(".safetensors"):
        return KOHYA_MARKER in safetensors_metadata(path)
    if name == LOSS_PLOT:
        return holds_our_run(folder)
    return False


def foreign_files(args):
    """What in output_dir a run would replace but did not write: files at the names it writes at the end, and
    checkpoint-N folders (whose names its checkpoints take, and 'latest' would pick). [(name, what)]."""
    folder = args.output_dir
    try:
        entries = os.listdir(folder)
    except OSError:  # none yet, or not readable: nothing there to replace
        return []
    found = [(name, what) for name, what in final_files(folder, args.output_format,
                                                        args.train_text_encoder_ti).items()
             if os.path.lexists(os.path.join(folder, name)) and not is_ours(folder, name)]
    found += [(name + "/", "checkpoints") for name in sorted(entries, key=_step_order)
              if CHECKPOINT.match(name) and os.path.isdir(os.path.join(folder, name))
              and not is_our_checkpoint(os.path.join(folder, name))]
    return found


def _step_order(name):
    match = CHECKPOINT.match(name)
    return (int(match.group(1)) if match else -1, name)


def check_foreign_files(args):
    """One line naming what the run would replace that it did not write, and the fix."""
    found = foreign_files(args)
    if not found:
        return
    names = _and([name for name, _ in found])
    whats = _and(list(dict.fromkeys(what for _, what in found)))
    them = "it" if len(found) == 1 else "them"
    raise UsageError(f"--output_dir {args.output_dir} holds {names}, not written by this trainer, which the run "
                     f"would replace with its own {whats}; move {them} out of the folder or choose another "
                     "--output_dir")


def _and(words):
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def upload_excludes(folder, output_format, embeddings, ignored=()):
    """--push_to_hub uploads the run, not the folder: exclude patterns for every entry of output_dir the run did
    not write (another LoRA beside it in a UI's folder, the user's notes), beyond the `ignored` patterns."""
    import fnmatch
    import glob
    ours = set(final_files(folder, output_format, embeddings))
    if not os.path.isdir(folder):
        return []
    entries = [n + "/" if os.path.isdir(os.path.join(folder, n)) else n for n in sorted(os.listdir(folder))
               if n not in ours and n != VALIDATION]
    grids = os.path.join(folder, VALIDATION)
    if os.path.isdir(grids):
        entries += [f"{VALIDATION}/{n}" + ("/" if os.path.isdir(os.path.join(grids, n)) else "")
                    for n in sorted(os.listdir(grids)) if not GRID.match(n)]
    return [glob.escape(e) for e in entries
            if not any(fnmatch.fnmatch(e, p) or fnmatch.fnmatch(e.rstrip("/"), p.rstrip("/")) for p in ignored)]


# ---- --overwrite_output_dir ------------------------------------------------------------------------------------
def previous_run_files(folder):
    """The previous run's own files and folders in output_dir (paths): its LoRA, UI and embedding files (by their
    names for this folder and their content), card, recipe, stats, plot, validation grids and checkpoints. Class
    images (a cache keyed by their settings) and tracker logs are not among them: they stay."""
    if not os.path.isdir(folder):
        return []
    name = run_name(folder)
    ours = [n for n in (LORA_WEIGHT_NAME, name + ".safetensors", name + EMB_SUFFIX, LOSS_PLOT, STATS, RECIPE, CARD)
            if is_ours(folder, n)]  # all decided before anything goes: the loss plot's owner is read from the rest
    paths = [os.path.join(folder, n) for n in ours]
    grids = os.path.join(folder, VALIDATION)
    if os.path.isdir(grids):
        paths += [os.path.join(grids, n) for n in sorted(os.listdir(grids))
                  if GRID.match(n) and os.path.isfile(os.path.join(grids, n))]
    for entry in sorted(os.listdir(folder), key=lambda n: _step_order(n.removesuffix(".tmp"))):
        path = os.path.join(folder, entry)
        if CHECKPOINT.match(entry.removesuffix(".tmp")) and is_our_checkpoint(path):
            paths.append(path)
    return paths


def clear_previous_run(folder):
    """--overwrite_output_dir: the previous run's own files go (so 'latest', infer.py and the UIs never pick up a
    stale one); everything else stays. Returns the names of what was kept that the run did not write."""
    for path in previous_run_files(folder):
        if os.path.isdir(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    grids = os.path.join(folder, VALIDATION)
    if os.path.isdir(grids) and not os.listdir(grids):
        os.rmdir(grids)
    return [n + ("/" if os.path.isdir(os.path.join(folder, n)) else "") for n in sorted(os.listdir(folder))
            if not n.startswith(".") and n not in (CLASS_IMAGES, "logs")]


def kept_note(folder, kept, limit=6):
    """The one note line saying what --overwrite_output_dir left in place (None when nothing)."""
    if not kept:
        return None
    more = f" and {len(kept) - limit} more" if len(kept) > limit else ""
    return (f"note: --overwrite_output_dir: removed the previous run's files from {folder}; kept {len(kept)} "
            f"entr{'y' if len(kept) == 1 else 'ies'} it did not write: {', '.join(kept[:limit])}{more}")


# ---- folders that must not overlap -----------------------------------------------------------------------------
def _real(path):
    return os.path.realpath(os.path.expanduser(str(path)))


def _within(inner, outer):
    """inner is outer or inside it (both real paths)."""
    return inner == outer or inner.startswith(outer.rstrip(os.sep) + os.sep)


def _where(inner, outer):
    return "is the same folder as" if inner == outer else "is inside"


def check_folders(args):
    """The run must never write where it reads training images, nor read its own outputs as training images:
    --output_dir, --class_data_dir (generated images go there), --logging_dir and --cache_dir against
    --instance_data_dir, and against each other; nor into the base model's folder. Compared as real paths (symlinks and relative paths resolved).
    One line naming both flags and the fix."""
    out_flag = f"--output_dir {args.output_dir}"
    out = _real(args.output_dir)
    inst = _real(args.instance_data_dir) if args.instance_data_dir and not args.dataset_name else None
    generates = args.with_prior_preservation and getattr(args, "prior_preservation_mode", "images") == "images"
    cls = _real(args.class_data_dir) if generates and args.class_data_dir else None
    logs = None
    if (args.report_to or "none") != "none" and args.logging_dir:
        logs = _real(os.path.join(args.output_dir, args.logging_dir))
    cache = _real(args.cache_dir) if args.cache_dir else None
    # folders inside output_dir the run writes into (the top level only holds its own named files)
    written = [(os.path.join(out, VALIDATION), "validation grids")]
    if logs and _within(logs, out):
        written.append((logs, "tracker logs"))
    if generates and not args.class_data_dir:
        written.append((os.path.join(out, CLASS_IMAGES), "generated class images"))

    def inside_written(path):
        for folder, what in written:
            if _within(path, folder):
                return folder, what
        rest = os.path.relpath(path, out).split(os.sep)[0] if _within(path, out) and path != out else ""
        if CHECKPOINT.match(rest.removesuffix(".tmp")):
            return os.path.join(out, rest), "checkpoints"
        return None

    if inst:
        inst_flag = f"--instance_data_dir {args.instance_data_dir}"
        if _within(out, inst):
            raise UsageError(f"{out_flag} {_where(out, inst)} {inst_flag}: the run's images (validation grids, loss "
                             "plot, class images) would end up among the training photos; choose an --output_dir "
                             "outside the photos' folder")
        hit = inside_written(inst)
        if hit:
            raise UsageError(f"{inst_flag}: the run writes its {hit[1]} into {hit[0]} ({out_flag}); move the photos "
                             "to a folder of their own")
        if cls and (_within(cls, inst) or _within(inst, cls)):
            cls_flag = f"--class_data_dir {args.class_data_dir}"
            relation = (f"{cls_flag} {_where(cls, inst)} {inst_flag}" if _within(cls, inst)
                        else f"{inst_flag} is inside {cls_flag}")
            raise UsageError(f"{relation}: generated class images and training photos would share a folder; give "
                             "--class_data_dir a folder of its own, apart from --instance_data_dir")
        for flag, value, path, what in (("--logging_dir", args.logging_dir, logs, "tracker logs"),
                                        ("--cache_dir", args.cache_dir, cache, "model downloads")):
            if path and _within(path, inst):
                raise UsageError(f"{flag} {value} {_where(path, inst)} {inst_flag}: {what} would be written among "
                                 f"the training photos; choose a {flag} elsewhere")
    if cls:
        cls_flag = f"--class_data_dir {args.class_data_dir}"
        default = f"--class_data_dir {os.path.join(args.output_dir, CLASS_IMAGES)} (the default)"
        if cls == out:
            raise UsageError(f"{cls_flag} is the same folder as {out_flag}: the run's own images (loss plot) would be "
                             f"read as class images; use a subfolder, e.g. {default}")
        hit = inside_written(cls)
        if hit:
            raise UsageError(f"{cls_flag}: the run writes its {hit[1]} into {hit[0]} ({out_flag}); use another "
                             f"folder, e.g. {default}")
        for flag, value, path, what in (("--logging_dir", args.logging_dir, logs, "tracker logs"),
                                        ("--cache_dir", args.cache_dir, cache, "model downloads")):
            if path and _within(path, cls):
                raise UsageError(f"{flag} {value} {_where(path, cls)} {cls_flag}: {what} would be written among the "
                                 f"class images; choose a {flag} elsewhere")
    model = str(args.pretrained_model_name_or_path or "")
    if model and os.path.isdir(model) and _within(out, _real(model)):
        raise UsageError(f"{out_flag} {_where(out, _real(model))} --pretrained_model_name_or_path {model}: the run's "
                         "files would be written into the base model's folder; choose an --output_dir outside it")
    if cache and (cache == out or (_within(cache, out) and args.push_to_hub)):
        raise UsageError(f"--cache_dir {args.cache_dir} {_where(cache, out)} {out_flag}: the downloaded models would "
                         "mix with the run's files" + (" and be uploaded by --push_to_hub" if args.push_to_hub else "")
                         + "; choose a --cache_dir outside --output_dir")


# ---- one run per folder ----------------------------------------------------------------------------------------
class FolderLock:
    """An exclusive flock on the output folder itself, held for the process's lifetime: a second run into the
    same folder (or a --resume_from_checkpoint while the first still trains) is refused with one line. The
    kernel releases it when the process exits, however it exits, so a crashed or killed run leaves nothing
    stuck and no lock file behind. Taken before the flags are checked (a second run must not even read the
    folder's state mid-write) and so before --overwrite_output_dir deletes anything. Only the main process takes
    it: the other ranks of a multi-process run are the same run. A folder that does not exist yet is created for
    the lock and removed again (with any parents made for it) if the run ends before writing into it."""

    def __init__(self, folder, main_process=True):
        self.folder, self.main_process, self.fd, self.created = folder, main_process, None, []

    def __enter__(self):
        folder = self.folder
        if fcntl is None or not self.main_process or not folder or not str(folder).strip() or os.path.isfile(folder) \
                or writable_folder_problem(folder):
            return self  # nothing to lock here: the flag checks say what is wrong with the folder, if anything
        probe, missing = os.path.abspath(folder), []
        while not os.path.exists(probe):
            missing.append(probe)
            probe = os.path.dirname(probe)
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError:  # not writable, a broken link...: the flag checks report it in their words
            self.created = [p for p in missing if os.path.isdir(p)]
            return self
        self.created = missing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            self._remove_created()
            raise UsageError(f"--output_dir {folder} is in use by another training run that is still going; wait "
                             "for it to end (or stop it), or choose another --output_dir") from None
        except OSError:  # a file system without flock (some network mounts): run unguarded rather than not at all
            os.close(fd)
            return self
        self.fd = fd
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None
        self._remove_created()
        return False

    def _remove_created(self):
        """The folders made for the lock, deepest first, while they are still empty (a run that wrote nothing)."""
        for path in self.created:
            try:
                os.rmdir(path)
            except OSError:
                break
        self.created = []
