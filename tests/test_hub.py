"""--push_to_hub against a fake Hub on 127.0.0.1 (tests/fake_hub.py): nothing here reaches huggingface.co. The
pieces in process (the repo prepared before training, the upload of exactly the run's results, the retry command
of a failed upload, the offline and repo-name checks), then the trainer's own push in a subprocess: uploaded, a
bad token refused before training, a failed upload keeping every file."""
import os
import shlex
import subprocess
import sys
from types import SimpleNamespace

import pytest


from dreambooth import hub  # noqa: E402
from conftest import HANG_GUARD, MachineClock, run_script, train_args
from dreambooth.errors import UsageError  # noqa: E402

P = "train_dreambooth_lora.py: error: "
NO_BACKOFF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "no_hub_backoff.py")
TOKEN = "hf_fake_token"
UPLOADED = {
    "pytorch_lora_weights.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    "README.md": b"---\nlicense: creativeml-openrail-m\nbase_model: tiny-sd\n---\n# LoRA\n",
    "config.yaml": b"learning_rate: 0.0001\n",
    "validation/step-000010.png": b"png-10",
    "loss.png": b"png-loss",
    "train_stats.json": b"{\"steps\": 10}",
}
KEPT_LOCAL = {
    "checkpoint-10/pytorch_lora_weights.safetensors": b"ckpt",
    "checkpoint-20.tmp/optimizer.bin": b"staging",
    "class_images/0.png": b"prior",
    "logs/events.out": b"tb",
    "half-written.tmp": b"tmp",
    ".hidden": b"dot",
    "validation/.DS_Store": b"dot",
}
EXCLUDES = ("--exclude 'checkpoint-*' --exclude class_images/ --exclude logs/ --exclude '*.tmp' --exclude '.*' "
            "--exclude '*/.*' --commit-message 'End of training'")


def make_run(folder):
    for rel, data in {**UPLOADED, **KEPT_LOCAL}.items():
        path = folder / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def flags(**kw):
    return SimpleNamespace(**{"push_to_hub": True, "hub_model_id": None, "hub_token": None, "output_dir": "out", **kw})


@pytest.fixture
def no_backoff(monkeypatch):
    """huggingface_hub retries a failed commit 5 times over ~23 s; the retries stay, the waiting goes."""
    import huggingface_hub.utils._http as http
    monkeypatch.setattr(http, "time", SimpleNamespace(sleep=lambda seconds: None))


# ---- prepare_repo: the repo exists before training starts --------------------------------------------------

def test_prepare_repo_creates_the_repo_named_after_output_dir(fake_hub, tmp_path):
    out = tmp_path / "my-run"
    assert hub.prepare_repo(None, str(out), TOKEN) == "fake-user/my-run"
    assert fake_hub.repos == {"fake-user/my-run": {}}
    assert hub.prepare_repo(None, str(out), TOKEN) == "fake-user/my-run"  # a rerun finds it (409 from the Hub)
    assert hub.prepare_repo("fake-org/dog-lora", str(out), TOKEN) == "fake-org/dog-lora"
    assert set(fake_hub.repos) == {"fake-user/my-run", "fake-org/dog-lora"}


def test_prepare_repo_refuses_someone_elses_namespace(fake_hub, tmp_path):
    with pytest.raises(UsageError) as e:
        hub.prepare_repo("someone/dog-lora", str(tmp_path), TOKEN)
    assert str(e.value) == ("--hub_model_id someone/dog-lora: the namespace 'someone' is not yours (the token belongs "
                            "to 'fake-user'); use --hub_model_id fake-user/dog-lora or one of your organizations "
                            "(fake-org)")
    assert fake_hub.repos == {}


def test_prepare_repo_bad_token_is_one_line(fake_hub, tmp_path):
    fake_hub.reject_tokens = True
    with pytest.raises(UsageError) as e:
        hub.prepare_repo(None, str(tmp_path / "my-run"), "hf_wrong")
    assert str(e.value) == (f"--hub_token: {fake_hub.endpoint} refused the token (401 Unauthorized) while preparing "
                            f"my-run; pass a write token with --hub_token or run `hf auth login` "
                            f"(https://huggingface.co/settings/tokens)")
    assert fake_hub.repos == {}


def test_prepare_repo_server_down_names_the_endpoint(fake_hub, tmp_path):
    fake_hub.stop()
    with pytest.raises(UsageError) as e:
        hub.prepare_repo("fake-user/x", str(tmp_path), TOKEN)
    assert str(e.value) == (f"--push_to_hub: cannot reach the Hub at {fake_hub.endpoint} ([Errno 111] Connection "
                            f"refused) while preparing fake-user/x; check the network and HF_ENDPOINT, or drop "
                            f"--push_to_hub and upload output_dir later with `hf upload`")


# ---- upload_run: the results go up, the training state does not -------------------------------------------

def test_upload_sends_exactly_the_results(fake_hub, tmp_path):
    out = make_run(tmp_path / "my-run")
    repo_id = hub.prepare_repo(None, str(out), TOKEN)
    ok, message = hub.upload_run(str(out), repo_id, TOKEN)
    assert (ok, message) == (True, f"uploaded {out} to {fake_hub.endpoint}/fake-user/my-run")
    assert set(fake_hub.repos[repo_id]) == set(UPLOADED)
    assert fake_hub.repos[repo_id]["pytorch_lora_weights.safetensors"] == UPLOADED["pytorch_lora_weights.safetensors"]
    assert fake_hub.commits == [("fake-user/my-run", "End of training")]


def test_upload_extra_ignore(fake_hub, tmp_path):
    out = make_run(tmp_path / "my-run")
    (out / "tb").mkdir()
    (out / "tb" / "events").write_bytes(b"x")
    repo_id = hub.prepare_repo(None, str(out), TOKEN)
    assert hub.upload_run(str(out), repo_id, TOKEN, extra_ignore=["tb/"])[0]
    assert set(fake_hub.repos[repo_id]) == set(UPLOADED)


def test_failed_commit_keeps_files_and_gives_a_retry_command_that_works(fake_hub, tmp_path, no_backoff):
    out = make_run(tmp_path / "my-run")
    repo_id = hub.prepare_repo(None, str(out), TOKEN)
    before = tree(out)
    fake_hub.fail_commits = 500
    ok, message = hub.upload_run(str(out), repo_id, TOKEN)
    assert ok is False
    assert message == (f"--push_to_hub: upload to fake-user/my-run failed: {fake_hub.endpoint} answered 500: fake hub: "
                       f"commit failed on purpose; nothing was deleted, the files are still in {out}; retry with: "
                       f"hf upload fake-user/my-run {out} . {EXCLUDES} --token YOUR_HUB_TOKEN")
    assert fake_hub.commit_attempts > 0 and fake_hub.repos[repo_id] == {}
    assert tree(out) == before

    # The printed command, run as printed (token filled in), uploads the same files as upload_run would.
    fake_hub.fail_commits = None
    command = message.split("retry with: ")[1].replace("YOUR_HUB_TOKEN", TOKEN)
    env = dict(os.environ, HF_ENDPOINT=fake_hub.endpoint, HF_HOME=str(tmp_path / "hf_home"),
               HF_HUB_DISABLE_UPDATE_CHECK="1", HF_HUB_DISABLE_TELEMETRY="1",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN"):
        env.pop(var, None)
    run = subprocess.run(shlex.split(command), env=env, capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.returncode == 0, run.stderr[-2000:]
    assert set(fake_hub.repos[repo_id]) == set(UPLOADED)
    assert fake_hub.commits == [("fake-user/my-run", "End of training")]


def test_upload_bad_token_without_token_flag(fake_hub, tmp_path):
    out = make_run(tmp_path / "my-run")
    fake_hub.repos["fake-user/my-run"] = {}
    fake_hub.reject_tokens = True
    ok, message = hub.upload_run(str(out), "fake-user/my-run", None)
    assert (ok, message) == (False, f"--push_to_hub: upload to fake-user/my-run failed: {fake_hub.endpoint} refused "
                                    f"the token (401 Unauthorized); nothing was deleted, the files are still in {out}; "
                                    f"retry with: hf upload fake-user/my-run {out} . {EXCLUDES}")


def test_upload_of_a_missing_folder(tmp_path):
    assert hub.upload_run(str(tmp_path / "gone"), "u/x", TOKEN) == (
        False, f"--push_to_hub: nothing to upload to u/x: {tmp_path / 'gone'} is not a folder")


# ---- check_hub_flags: no network, before the model loads --------------------------------------------------

@pytest.mark.parametrize("var,value", [("HF_HUB_OFFLINE", "1"), ("TRANSFORMERS_OFFLINE", "true")])
def test_offline_mode_refuses_push(monkeypatch, var, value):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(var, value)
    with pytest.raises(UsageError) as e:
        hub.check_hub_flags(flags())
    assert str(e.value) == (f"--push_to_hub: {var}={value} is set, so nothing can be uploaded; unset {var}, or drop "
                            f"--push_to_hub and upload output_dir later with `hf upload`")
    monkeypatch.setenv(var, "0")
    assert hub.check_hub_flags(flags()) == []


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad name", "-x", "x.", "x--y", "u/x..y", "a" * 97, "dög", ""])
def test_invalid_hub_model_id(monkeypatch, repo_id):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(UsageError) as e:
        hub.check_hub_flags(flags(hub_model_id=repo_id))
    assert str(e.value) == (f"--hub_model_id {repo_id}: not a valid Hub repo id; use 'name' or 'namespace/name' with "
                            f"letters, digits, '-', '_' and '.' (at most 96 characters, no '--' or '..', not starting "
                            f"or ending with '-' or '.')")


@pytest.mark.parametrize("repo_id", ["a/b/c", "bad name", "-x", "x.", "x--y", "u/x..y", "a" * 97, "ok", "u/ok_1.2-3",
                                     "_x", "u/" + "a" * 96])
def test_repo_id_rules_agree_with_huggingface_hub(repo_id):
    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(repo_id)
        theirs = True
    except HFValidationError:
        theirs = False
    assert hub.valid_repo_id(repo_id) == theirs


def test_output_dir_name_that_cannot_be_a_repo(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    with pytest.raises(UsageError) as e:
        hub.check_hub_flags(flags(output_dir="runs/my run"))
    assert str(e.value).startswith("--output_dir runs/my run: its folder name 'my run' is not a valid Hub repo name "
                                   "(the default for --hub_model_id); pass --hub_model_id, use 'name' or ")
    assert hub.check_hub_flags(flags(output_dir="runs/my run", hub_model_id="u/ok")) == []


def test_hub_flags_without_push_to_hub_warn(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # irrelevant when nothing is pushed
    assert hub.check_hub_flags(flags(push_to_hub=False, hub_model_id="u/x", hub_token="hf_secret")) == [
        "--hub_model_id u/x: ignored without --push_to_hub; add --push_to_hub to upload the run",
        "--hub_token: ignored without --push_to_hub; add --push_to_hub to upload the run",
    ]
    assert hub.check_hub_flags(flags(push_to_hub=False)) == []
    assert hub.check_hub_flags(flags(push_to_hub=False, hub_model_id="not valid at all")) != []  # a warning only


def test_import_does_not_load_huggingface_hub():
    code = "import sys, dreambooth.hub; print('huggingface_hub' in sys.modules)"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    run = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=HANG_GUARD)
    assert run.stdout.strip() == "False", run.stderr


# ---- --push_to_hub from the trainer, a subprocess against the fake Hub --------------------------------------


def push(tiny_model, instance_dir, out, hub, *extra, launcher=None):
    return run_script("train_dreambooth_lora.py", *train_args(tiny_model["eps"], instance_dir, out,
                                                               "--max_train_steps", "2", "--checkpointing_steps", "1",
                                                               "--report_to", "none", "--push_to_hub",
                                                               "--hub_token", "secret-token", *extra),
                      env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_OFFLINE": "0"}, launcher=launcher)


@pytest.mark.slow
def test_push_to_hub_uploads_the_run(tiny_model, instance_dir, tmp_path, fake_hub):
    out = tmp_path / "dog-lora"
    r = push(tiny_model, instance_dir, out, fake_hub)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"uploaded {out} to {fake_hub.endpoint}/fake-user/dog-lora" in r.stdout
    files = fake_hub.repos["fake-user/dog-lora"]
    assert {"pytorch_lora_weights.safetensors", "dog-lora.safetensors", "README.md", "config.yaml"} <= set(files)
    assert not any(p.startswith(("checkpoint-", "logs/")) for p in files)
    assert files["pytorch_lora_weights.safetensors"] == (out / "pytorch_lora_weights.safetensors").read_bytes()
    assert b"secret-token" not in files["README.md"] and b"secret-token" not in files["config.yaml"]


@pytest.mark.slow
def test_push_to_hub_bad_token_fails_before_training(tiny_model, instance_dir, tmp_path, fake_hub):
    fake_hub.reject_tokens = True
    out = tmp_path / "dog-lora"
    with MachineClock() as clock:
        r = push(tiny_model, instance_dir, out, fake_hub)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [P + (
        f"--hub_token: {fake_hub.endpoint} refused the token (401 Unauthorized) while preparing dog-lora; pass a write "
        "token with --hub_token or run `hf auth login` (https://huggingface.co/settings/tokens)")]
    assert not out.exists() and clock.seconds < clock.budget(30)


@pytest.mark.slow
def test_push_to_hub_failed_upload_keeps_everything(tiny_model, instance_dir, tmp_path, fake_hub):
    fake_hub.fail_commits = 500
    out = tmp_path / "dog-lora"
    r = push(tiny_model, instance_dir, out, fake_hub, launcher=[sys.executable, NO_BACKOFF])  # retries, no waits
    assert r.returncode == 4, r.stderr[-3000:]
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith("--push_to_hub: upload to fake-user/dog-lora failed: ")
    assert f"nothing was deleted, the files are still in {out}; retry with: hf upload fake-user/dog-lora {out} ." in line
    assert os.path.isfile(out / "pytorch_lora_weights.safetensors") and os.path.isdir(out / "checkpoint-2")
