"""Nothing lost, nothing leaked (issue #25): a run deletes or replaces only what a run of ours wrote, writes the Hub
token into no file however it was given, keeps a second run out of a folder one is training in, never writes
among the training photos, and every config.yaml it writes replays; an output folder that is not writable or
holds a finished run is refused before anything loads, --overwrite_output_dir replaces a finished run, files are
written whole (atomic replace, free space checked first) and follow the umask. Most cases end before any model
loads; a few tiny runs (one or two steps) cover what only a finished run shows."""
import fcntl
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import conftest
from conftest import train_args
from dreambooth import outputs, redaction
from dreambooth.config import parse_args, recipe_yaml, validate
from dreambooth.errors import UsageError
from dreambooth.run_config import RunRecord

TOKENS = ("hf_ABBREVIATEDtoken1", "hf_EQUALSformTOKEN2", "hf_CONFIGfileTOKEN3", "hf_ENVIRONMENTtoken4")


@pytest.fixture
def world(world, monkeypatch):
    """conftest's world (the tiny SD model, two photos), offline and without trackers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tmp_path, dog, out, argv = world

    def quiet(*extra, **overrides):
        return argv(*extra, **{"report_to": "none", **overrides})
    return tmp_path, dog, out, quiet


def fails_with(world, capsys, line, *extra, **overrides):
    """conftest's fails_with, the line's {t} standing for the test's tmp_path."""
    conftest.fails_with(world, capsys, line.format(t=world[0]), *extra, **overrides)


def every_file(folder):
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


def previous_run(folder, name=None):
    """The files a finished run of ours leaves, as they identify themselves (markers in the card, the recipe and the
    kohya header; final_step in the stats; lora_settings.json in a checkpoint)."""
    name = name or os.path.basename(folder)
    os.makedirs(os.path.join(folder, "validation"), exist_ok=True)
    os.makedirs(os.path.join(folder, "checkpoint-1"), exist_ok=True)
    lora = {"unet.a.lora_A.weight": torch.zeros(2, 2)}
    save_file(lora, os.path.join(folder, "pytorch_lora_weights.safetensors"))
    save_file(lora, os.path.join(folder, f"{name}.safetensors"), metadata={"dreambooth_lora_version": "0.1.0"})
    save_file(lora, os.path.join(folder, f"{name}_emb.safetensors"), metadata={"dreambooth_token_map": "{}"})
    save_file(lora, os.path.join(folder, "checkpoint-1", "pytorch_lora_weights.safetensors"))
    files = {"README.md": "---\n---\n```\naccelerate launch train_dreambooth_lora.py --rank 4\n```\n",
             "config.yaml": outputs.RECIPE_MARKER + ": replay it with\nrank: 4\n",
             "train_stats.json": json.dumps({"final_step": 1}), "loss.png": "png",
             "validation/step-000001.png": "png", "checkpoint-1/lora_settings.json": "{}"}
    for path, text in files.items():
        with open(os.path.join(folder, path), "w") as f:
            f.write(text)


# ---- 1. deleting what the run did not write ------------------------------------------------------------------
def test_overwrite_removes_only_the_previous_runs_own_files(tmp_path):
    """A UI's LoRA folder: other LoRAs (one of them ours, from another run), embeddings, a checkpoint-foo folder, the
    user's notes and pictures stay; the previous run's files at this folder's names go, and the note says what
    stayed."""
    folder = tmp_path / "loras"
    previous_run(str(folder))
    lora = {"w": torch.zeros(2)}
    save_file(lora, str(folder / "other.safetensors"), metadata={"dreambooth_lora_version": "0.1.0"})
    save_file(lora, str(folder / "cat_emb.safetensors"), metadata={"dreambooth_token_map": "{}"})
    save_file(lora, str(folder / "downloaded.safetensors"))
    (folder / "checkpoint-foo").mkdir()
    (folder / "checkpoint-foo" / "optimizer.bin").write_bytes(b"mine")
    (folder / "notes.txt").write_text("mine")
    (folder / "validation" / "favourite.png").write_text("mine")
    (folder / "class_images").mkdir()
    (folder / "class_images" / "prior-0123456789-00000.png").write_text("cache")
    kept = outputs.clear_previous_run(str(folder))
    assert kept == ["cat_emb.safetensors", "checkpoint-foo/", "downloaded.safetensors", "notes.txt",
                    "other.safetensors", "validation/"]
    assert sorted(every_file(str(folder))) == [
        "cat_emb.safetensors", "checkpoint-foo/optimizer.bin", "class_images/prior-0123456789-00000.png",
        "downloaded.safetensors", "notes.txt", "other.safetensors", "validation/favourite.png"]
    assert outputs.kept_note(str(folder), kept) == (
        f"note: --overwrite_output_dir: removed the previous run's files from {folder}; kept 6 entries it did not "
        "write: cat_emb.safetensors, checkpoint-foo/, downloaded.safetensors, notes.txt, other.safetensors, "
        "validation/")
    assert outputs.kept_note(str(folder), kept, limit=2).endswith("kept 6 entries it did not write: "
                                                                   "cat_emb.safetensors, checkpoint-foo/ and 4 more")


FOREIGN_CASES = [  # (id, what is in the folder, extra flags, the line)
    ("README of a project", {"README.md": "# my project\n"}, (),
     "--output_dir {t}/out holds README.md, not written by this trainer, which the run would replace with its own "
     "model card; move it out of the folder or choose another --output_dir"),
    ("hand-written recipe", {"config.yaml": "rank: 8\n"}, (),
     "--output_dir {t}/out holds config.yaml, not written by this trainer, which the run would replace with its own "
     "run recipe; move it out of the folder or choose another --output_dir"),
    ("another trainer's LoRA under the UI file's name", {"out.safetensors": b"kohya"}, ("--overwrite_output_dir",),
     "--output_dir {t}/out holds out.safetensors, not written by this trainer, which the run would replace with its "
     "own kohya-format LoRA; move it out of the folder or choose another --output_dir"),
    ("stats and plot of something else", {"train_stats.json": "{}", "loss.png": b"png"}, (),
     "--output_dir {t}/out holds loss.png and train_stats.json, not written by this trainer, which the run would "
     "replace with its own loss plot and run statistics; move them out of the folder or choose another --output_dir"),
    ("an embedding under the pivotal file's name", {"out_emb.safetensors": b"x"}, ("--train_text_encoder_ti",),
     "--output_dir {t}/out holds out_emb.safetensors, not written by this trainer, which the run would replace with "
     "its own token embeddings; move it out of the folder or choose another --output_dir"),
    ("diffusers' checkpoint folder", {"checkpoint-5/optimizer.bin": b"x"}, (),
     "--output_dir {t}/out holds checkpoint-5/, not written by this trainer, which the run would replace with its "
     "own checkpoints; move it out of the folder or choose another --output_dir"),
]


@pytest.mark.parametrize("name,files,extra,line", FOREIGN_CASES, ids=[c[0] for c in FOREIGN_CASES])
def test_files_the_run_did_not_write_are_never_replaced(world, capsys, name, files, extra, line):
    out = world[2]
    for path, content in files.items():
        (out / path).parent.mkdir(parents=True, exist_ok=True)
        (out / path).write_bytes(content if isinstance(content, bytes) else content.encode())
    fails_with(world, capsys, line, *extra)


def test_what_the_run_may_share_a_folder_with(world, capsys):
    """Other LoRAs, embeddings, checkpoint-foo and the files of a run of ours are no obstacle; the kohya file of the
    previous run (ours, by its header) is replaced by --overwrite_output_dir."""
    tmp_path, dog, out, argv = world
    out.mkdir()
    save_file({"w": torch.zeros(2)}, str(out / "other.safetensors"))
    (out / "checkpoint-foo").mkdir()
    (out / "notes.txt").write_text("mine")
    args = parse_args(argv())
    validate(args, warn=lambda note: None)
    previous_run(str(out))
    args = parse_args(argv("--overwrite_output_dir", "--train_text_encoder_ti", instance_prompt="a TOK dog"))
    validate(args, warn=lambda note: None)
    assert outputs.foreign_files(args) == []


def test_push_to_hub_uploads_the_run_not_the_folder(tmp_path):
    from argparse import Namespace
    from dreambooth.hub import IGNORE
    folder = tmp_path / "loras"
    previous_run(str(folder))
    (folder / "other.safetensors").write_bytes(b"x")
    (folder / "[mine].png").write_bytes(b"x")
    (folder / "validation" / "favourite.png").write_text("mine")
    (folder / "logs").mkdir()
    args = Namespace(output_dir=str(folder), output_format="both", train_text_encoder_ti=False)
    assert outputs.upload_excludes(args.output_dir, args.output_format, args.train_text_encoder_ti, IGNORE) == [
        "[[]mine].png", "loras_emb.safetensors", "other.safetensors", "validation/favourite.png"]


# ---- 2. secrets -----------------------------------------------------------------------------------------------
def test_token_spellings_are_redacted_and_scrubbed(monkeypatch):
    assert redaction.is_token_option("--hub_tok") and redaction.is_token_option("--hub_t=x")
    assert redaction.is_token_option("--hub-token") and not redaction.is_token_option("--hub_model_id")
    assert not redaction.is_token_option("--hub_") and not redaction.is_token_option("hub_token")
    monkeypatch.setattr(redaction, "_known", set())
    monkeypatch.setenv("HF_TOKEN", "hf_fromTheEnvironment")
    redaction.remember_from_argv(["--hub_tok", "hf_abbreviated1", "--hub_tokn=hf_misspelt22", "--rank", "4"])
    assert redaction.redact_argv(["--hub_tok", "hf_abbreviated1", "--hub_token=x", "--hub_tokn=hf_misspelt22",
                                  "--instance_prompt", "a hf_fromTheEnvironment dog"]) == [
        "--hub_tok", "HUB_TOKEN", "--hub_token=HUB_TOKEN", "--hub_tokn=HUB_TOKEN", "--instance_prompt",
        "a HUB_TOKEN dog"]
    assert redaction.scrub("x hf_misspelt22 y") == "x HUB_TOKEN y"
    assert redaction.scrub("short tok") == "short tok"  # values shorter than MIN_LENGTH are never remembered


def test_token_never_echoed_by_an_error_line(world, capsys):
    """A misspelt token flag is refused by argparse, whose line would show the token."""
    fails_with(world, capsys, "unrecognized arguments: --hub-token HUB_TOKEN", "--hub-token", "hf_misspeltFlagToken")


def test_no_token_in_any_file_replays_and_overwrite(world, in_process, capsys, monkeypatch):
    """The token given in every way at once (an abbreviation, the = form of another, a --config file, HF_TOKEN):
    none reaches the card, config.yaml, stats, tracker logs, checkpoint files or safetensors headers. The run is a
    text-encoder + pivotal one, whose config.yaml must replay: into another folder, also with a flag changed,
    never with --overwrite_output_dir (not saved), and into its own folder it is refused. Then other files join it
    and a plain run replaces it with --overwrite_output_dir: the old run's files go (its embeddings too, which
    infer.py would otherwise load with the new LoRA), the others stay, and one note line says which."""
    tmp_path, dog, out, argv = world
    monkeypatch.setenv("HF_TOKEN", TOKENS[3])
    config = tmp_path / "private.yaml"
    config.write_text(f"hub_token: {TOKENS[2]}\nrank: 2\n")
    flags = argv("--config", config, "--hub_tok", TOKENS[0], "--hub_to=" + TOKENS[1], "--train_text_encoder",
                 "--train_text_encoder_ti", "--max_train_steps", "1", "--checkpointing_steps", "1",
                 "--overwrite_output_dir", instance_prompt="a photo of TOK dog", report_to="tensorboard")
    assert in_process(flags) == 0
    captured = capsys.readouterr()
    files = every_file(str(out))
    assert {"README.md", "config.yaml", "train_stats.json", "out.safetensors", "out_emb.safetensors",
            "checkpoint-1/lora_settings.json", "checkpoint-1/out-step00000001.safetensors"} <= set(files)
    assert any(p.startswith("logs/") for p in files)
    for token in TOKENS:
        assert [p for p, data in files.items() if token.encode() in data] == [], token
        assert token not in captured.out + captured.err
    card = files["README.md"].decode()
    assert "--hub_tok HUB_TOKEN --hub_to=HUB_TOKEN" in card and f"--config {config}" in card
    recipe = files["config.yaml"].decode()
    assert recipe.startswith(outputs.RECIPE_MARKER)
    assert not [k for k in ("overwrite_output_dir", "resume_from_checkpoint", "push_to_hub", "hub_model_id", "hub_token")
                if k in recipe]  # a replay never replaces, continues or re-uploads the run it came from
    assert "\nrank: 2\n" in recipe and "\npre_compute_text_embeddings: null\n" in recipe
    assert "\n#   pre_compute_text_embeddings: false\n" in recipe  # what the run decided, for the reader

    # the replay into its own folder, one flag changed: refused, not silently replaced
    saved = str(out / "config.yaml")
    fails_with(world, capsys, f"--output_dir {out} already holds a finished run (pytorch_lora_weights.safetensors); "
               "choose another folder, add --overwrite_output_dir to replace it, or continue it with "
               "--resume_from_checkpoint latest and a higher --max_train_steps", "--config", saved, "--rank", "8",
               pretrained_model_name_or_path=None, instance_data_dir=None, instance_prompt=None, output_dir=None,
               resolution=None, report_to=None)
    # into another folder it replays as it is, and with the text encoders no longer trained or trained differently
    for changed in ([], ["--no-train_text_encoder", "--no-train_text_encoder_ti"], ["--no-train_text_encoder_ti"]):
        args = parse_args(["--config", saved, "--output_dir", str(tmp_path / "other"), *changed])
        validate(args, warn=lambda note: None)
        assert not args.overwrite_output_dir and args.rank == 2

    save_file({"w": torch.zeros(2)}, str(out / "other.safetensors"))
    (out / "notes.txt").write_text("mine")
    other = (out / "other.safetensors").read_bytes()
    capsys.readouterr()
    assert in_process(argv("--max_train_steps", "1", "--checkpointing_steps", "5", "--overwrite_output_dir")) == 0
    assert (f"note: --overwrite_output_dir: removed the previous run's files from {out}; kept 2 entries it did not "
            "write: notes.txt, other.safetensors") in capsys.readouterr().err.splitlines()
    assert (out / "other.safetensors").read_bytes() == other and (out / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["README.md", "config.yaml", "logs", "loss.png", "notes.txt", "other.safetensors",
                                       "out.safetensors", "pytorch_lora_weights.safetensors", "train_stats.json"]


def test_recipe_of_a_plain_run_replays_with_text_encoders_and_on_another_family(tiny_model, instance_dir, tmp_path,
                                                                                   monkeypatch):
    """What the run decided (text embeddings computed once, the family's resolution, Flux's guidance) is saved as
    undecided: a replay that trains the text encoders, or another family's model, decides again instead of failing
    on a flag the user never gave."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for model, others in (("eps", ("--train_text_encoder", "--train_text_encoder_ti")), ("flux", ("eps", "sd3"))):
        args = parse_args(["--pretrained_model_name_or_path", tiny_model[model], "--instance_data_dir", instance_dir,
                           "--instance_prompt", "a photo of TOK dog", "--output_dir", str(tmp_path / model)])
        run = validate(args, warn=lambda note: None)
        as_run = RunRecord(pre_compute_text_embeddings=True, cache_latents=False, mixed_precision="no")
        saved = tmp_path / f"{model}.yaml"
        saved.write_text(recipe_yaml(run, as_run))
        for other in others:
            change = [other] if other.startswith("--") else ["--pretrained_model_name_or_path", tiny_model[other]]
            replay = parse_args(["--config", str(saved), "--output_dir", str(tmp_path / "replay"), *change])
            validate(replay, warn=lambda note: None)
    assert "\nguidance_scale: null\n" in saved.read_text() and "\n#   guidance_scale: 3.5\n" in saved.read_text()


# ---- 5. two runs, one folder ----------------------------------------------------------------------------------
BUSY = ("--output_dir {t}/out is in use by another training run that is still going; wait for it to end (or stop "
        "it), or choose another --output_dir")


def test_a_second_run_is_refused_while_one_trains(world, capsys):
    """The lock is a flock on the folder itself: held here as a running trainer holds it. A new run and a resume
    are refused before anything is read or deleted (even with --overwrite_output_dir)."""
    tmp_path, dog, out, argv = world
    out.mkdir()
    previous_run(str(out))
    fd = os.open(out, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fails_with(world, capsys, BUSY, "--overwrite_output_dir")
        fails_with(world, capsys, BUSY, "--resume_from_checkpoint", "latest", "--max_train_steps", "9")
        with outputs.FolderLock(str(out), main_process=False):  # the other ranks of the same run do not lock
            pass
    finally:
        os.close(fd)
    with outputs.FolderLock(str(out)) as lock:
        assert lock.fd is not None


def test_a_killed_run_leaves_no_lock(world, capsys):
    """kill -9 of the holder: the kernel drops the lock, nothing stale is left behind. A folder made for the lock is
    removed again when the run fails before writing into it."""
    tmp_path, dog, out, argv = world
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import os, fcntl, sys, time\n"
                               f"fd = os.open({str(out)!r}, os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX)\n"
                               "print('locked', flush=True); time.sleep(24 * 3600)"],  # until killed below
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        fails_with(world, capsys, BUSY)
    finally:
        holder.kill()
        holder.wait()
    with outputs.FolderLock(str(out)) as lock:
        assert lock.fd is not None
    assert os.listdir(out) == []
    fresh = tmp_path / "new" / "run"
    fails_with(world, capsys, "--resolution must be a positive multiple of 8 (got 7); try 512 for SD 1.5, 768 for "
               "SD 2.1", output_dir=str(fresh), resolution="7")
    assert not (tmp_path / "new").exists()


# ---- 8. the trainer writing into the user's photos ------------------------------------------------------------
OVERLAP_CASES = [  # (id, overrides or a function of tmp_path giving them, line)
    ("output is the photos' folder", lambda t: {"output_dir": f"{t}/dog"},
     "--output_dir {t}/dog is the same folder as --instance_data_dir {t}/dog: the run's images (validation grids, "
     "loss plot, class images) would end up among the training photos; choose an --output_dir outside the photos' "
     "folder"),
    ("output inside the photos' folder, relative", lambda t: {"output_dir": f"{t}/dog/../dog/run"},
     "--output_dir {t}/dog/../dog/run is inside --instance_data_dir {t}/dog: the run's images (validation grids, "
     "loss plot, class images) would end up among the training photos; choose an --output_dir outside the photos' "
     "folder"),
    ("photos in the output's validation folder", lambda t: {"instance_data_dir": f"{t}/out/validation"},
     "--instance_data_dir {t}/out/validation: the run writes its validation grids into {t}/out/validation "
     "(--output_dir {t}/out); move the photos to a folder of their own"),
    ("class images into the photos' folder", lambda t: {"class_data_dir": f"{t}/dog", "class_prompt": "a dog",
                                                         "with_prior_preservation": True},
     "--class_data_dir {t}/dog is the same folder as --instance_data_dir {t}/dog: generated class images and training "
     "photos would share a folder; give --class_data_dir a folder of its own, apart from --instance_data_dir"),
    ("photos inside the class folder", lambda t: {"class_data_dir": f"{t}", "class_prompt": "a dog",
                                                   "with_prior_preservation": True},
     "--instance_data_dir {t}/dog is inside --class_data_dir {t}: generated class images and training photos would "
     "share a folder; give --class_data_dir a folder of its own, apart from --instance_data_dir"),
    ("class images into the output folder", lambda t: {"class_data_dir": f"{t}/out", "class_prompt": "a dog",
                                                        "with_prior_preservation": True},
     "--class_data_dir {t}/out is the same folder as --output_dir {t}/out: the run's own images (loss plot) would be "
     "read as class images; use a subfolder, e.g. --class_data_dir {t}/out/class_images (the default)"),
    ("class images into a checkpoint", lambda t: {"class_data_dir": f"{t}/out/checkpoint-10", "class_prompt": "a dog",
                                                   "with_prior_preservation": True},
     "--class_data_dir {t}/out/checkpoint-10: the run writes its checkpoints into {t}/out/checkpoint-10 (--output_dir "
     "{t}/out); use another folder, e.g. --class_data_dir {t}/out/class_images (the default)"),
    ("tracker logs into the photos", lambda t: {"logging_dir": f"{t}/dog/tb", "report_to": "tensorboard"},
     "--logging_dir {t}/dog/tb is inside --instance_data_dir {t}/dog: tracker logs would be written among the "
     "training photos; choose a --logging_dir elsewhere"),
    ("model cache into the photos", lambda t: {"cache_dir": f"{t}/dog"},
     "--cache_dir {t}/dog is the same folder as --instance_data_dir {t}/dog: model downloads would be written among "
     "the training photos; choose a --cache_dir elsewhere"),
    ("output inside the base model's folder", lambda t: {"pretrained_model_name_or_path": f"{t}/model",
                                                          "output_dir": f"{t}/model/lora"},
     "--output_dir {t}/model/lora is inside --pretrained_model_name_or_path {t}/model: the run's files would be "
     "written into the base model's folder; choose an --output_dir outside it"),
    ("model cache is the output folder", lambda t: {"cache_dir": f"{t}/out"},
     "--cache_dir {t}/out is the same folder as --output_dir {t}/out: the downloaded models would mix with the run's "
     "files; choose a --cache_dir outside --output_dir"),
]


@pytest.mark.parametrize("name,overrides,line", OVERLAP_CASES, ids=[c[0] for c in OVERLAP_CASES])
def test_never_writes_among_the_training_photos(world, capsys, tiny_model, name, overrides, line):
    os.symlink(tiny_model["eps"], world[0] / "model")  # a base model folder of the user's
    fails_with(world, capsys, line, **overrides(world[0]))


def test_overlaps_are_compared_as_real_paths(world, capsys):
    """A symlink to the photos' folder is the photos' folder; photos in a project folder that is also the output
    folder are fine (the run writes only its own names at the top and its own subfolders)."""
    tmp_path, dog, out, argv = world
    os.symlink(dog, tmp_path / "link")
    fails_with(world, capsys, "--output_dir {t}/link/run is inside --instance_data_dir {t}/dog: the run's images "
               "(validation grids, loss plot, class images) would end up among the training photos; choose an "
               "--output_dir outside the photos' folder", output_dir=str(tmp_path / "link" / "run"))
    args = parse_args(argv(output_dir=str(tmp_path)))
    validate(args, warn=lambda note: None)


# ---- the output folder checked before anything loads, and files written whole ---------------------------------


def test_output_folder_not_writable(world, capsys, monkeypatch):
    """Checked before loading (as root the permission bits do not stop us, hence os.access is what we ask)."""
    tmp_path = world[0]
    locked = tmp_path / "locked"
    locked.mkdir()
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    fails_with(world, capsys, f"--output_dir {locked}/run: {locked} is not writable by this user; choose another "
               "folder or fix its permissions", output_dir=str(locked / "run"))


def test_finished_run_is_not_overwritten(world, capsys):
    tmp_path, dog, out, argv = world
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"finished")
    fails_with(world, capsys, f"--output_dir {out} already holds a finished run (pytorch_lora_weights.safetensors); "
               "choose another folder, add --overwrite_output_dir to replace it, or continue it with "
               "--resume_from_checkpoint latest and a higher --max_train_steps")


def test_atomic_write_keeps_old_file_when_writer_crashes(tmp_path):
    from dreambooth.files import atomic_write
    target = tmp_path / "w.safetensors"
    target.write_text("good")

    def crash(tmp):
        open(tmp, "w").write("half")
        raise OSError("disk full")
    with pytest.raises(OSError):
        atomic_write(str(target), crash)
    assert target.read_text() == "good" and os.listdir(tmp_path) == ["w.safetensors"]


def test_free_space_check_names_the_numbers(tmp_path):
    from dreambooth.files import check_free_space
    check_free_space(str(tmp_path / "new" / "dir"), 1, "x")
    with pytest.raises(UsageError, match=r"need .* MiB, .* MiB free"):
        check_free_space(str(tmp_path), 1 << 60, "class images")


# ---- runs that finish: replacing a finished run, file modes --------------------------------------------------


def one_line(capsys):
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1, err
    return err[0]


@pytest.mark.slow
def test_overwrite_output_dir(tiny_model, instance_dir, tmp_path, in_process, capsys):
    out = tmp_path / "out"
    base = train_args(tiny_model["eps"], instance_dir, str(out), "--max_train_steps", "2", "--checkpointing_steps",
                      "1", "--report_to", "none")
    assert in_process(base) == 0
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-1", "checkpoint-2"]
    capsys.readouterr()
    assert in_process(base) == 2 and "already holds a finished run" in one_line(capsys)
    assert in_process(base[:-6] + ["--max_train_steps", "1", "--checkpointing_steps", "5",
                                   "--overwrite_output_dir"]) == 0
    assert not any(p.startswith("checkpoint") for p in os.listdir(out))  # the old run's checkpoints are gone


@pytest.mark.slow
def test_files_follow_the_umask(tiny_model, instance_dir, tmp_path, in_process):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        assert in_process(train_args(tiny_model["eps"], instance_dir, str(out), "--max_train_steps", "1",
                                     "--report_to", "none")) == 0
    finally:
        os.umask(old)
    for name in ("pytorch_lora_weights.safetensors", "out.safetensors", "README.md", "config.yaml", "loss.png",
                 "train_stats.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o644, name
