"""--push_to_hub, as diffusers' training scripts do it, without the surprises.

The repo is created (or found) before training, so a bad token, a name someone else owns or a dead
network stops the run in seconds rather than after hours of training. The upload at the end never
raises: a failed upload must not cost a finished run, so it says where the files are and the exact
command that retries it. huggingface_hub is imported inside the functions: `--help` stays instant.
"""
import os
import re
import shlex

from .errors import UsageError, first_line

# Never uploaded: resumable training state (checkpoint-N and its .tmp staging), generated class
# priors, tracker logs, half-written files and dotfiles. Everything else in output_dir is the result.
IGNORE = ("checkpoint-*", "class_images/", "logs/", "*.tmp", ".*", "*/.*")
COMMIT_MESSAGE = "End of training"
TOKEN_FIX = "pass a write token with --hub_token or run `hf auth login` (https://huggingface.co/settings/tokens)"
# huggingface_hub's repo id rules (utils.validate_repo_id), kept here so the flag check imports nothing.
NAME = re.compile(r"^(?![-.])[A-Za-z0-9_.-]{1,96}(?<![-.])$")
REPO_ID_RULES = ("use 'name' or 'namespace/name' with letters, digits, '-', '_' and '.' (at most 96 characters, "
                 "no '--' or '..', not starting or ending with '-' or '.')")
TRUE = {"1", "ON", "YES", "TRUE"}  # what huggingface_hub takes as true in HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE


def valid_repo_id(repo_id):
    parts = repo_id.split("/")
    return len(parts) <= 2 and all(NAME.match(p) for p in parts) and "--" not in repo_id and ".." not in repo_id


def default_repo_name(output_dir):
    """diffusers' default, the output folder's name; abspath so that '.' and 'out/' name a folder too."""
    return os.path.basename(os.path.abspath(output_dir))


def check_hub_flags(args):
    """Checks that need no network, run before the model loads. Returns warnings to print; raises UsageError."""
    push, model_id = getattr(args, "push_to_hub", False), getattr(args, "hub_model_id", None)
    if not push:  # the flags do nothing; say so rather than let the user wait for an upload that never comes
        ignored = [f"--hub_model_id {model_id}"] if model_id else []
        ignored += ["--hub_token"] if getattr(args, "hub_token", None) else []  # the token itself is never echoed
        return [f"{flag}: ignored without --push_to_hub; add --push_to_hub to upload the run" for flag in ignored]
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):  # huggingface_hub refuses every request under either
        value = os.environ.get(var, "")
        if value.upper() in TRUE:
            raise UsageError(f"--push_to_hub: {var}={value} is set, so nothing can be uploaded; unset {var}, "
                             f"or drop --push_to_hub and upload output_dir later with `hf upload`")
    if model_id is not None and not valid_repo_id(model_id):
        raise UsageError(f"--hub_model_id {model_id}: not a valid Hub repo id; {REPO_ID_RULES}")
    name = default_repo_name(args.output_dir)
    if model_id is None and not valid_repo_id(name):
        raise UsageError(f"--output_dir {args.output_dir}: its folder name '{name}' is not a valid Hub repo name "
                         f"(the default for --hub_model_id); pass --hub_model_id, {REPO_ID_RULES}")
    return []


def is_network_error(e):
    # requests raises ConnectionError (an OSError), httpx/httpx2 raise TransportError subclasses: match
    # them by name so the check holds whichever HTTP client the installed huggingface_hub uses.
    return any(c.__name__ in ("TransportError", "ConnectionError", "Timeout") for c in type(e).__mro__)


def explain(e, endpoint):
    """(flag, what went wrong) for an exception out of huggingface_hub."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    if type(e).__name__ == "LocalTokenNotFoundError":
        return "--hub_token", "no token given and none saved by `hf auth login`"
    if status in (401, 403):
        reason = "Unauthorized" if status == 401 else "Forbidden"
        return "--hub_token", f"{endpoint} refused the token ({status} {reason})"
    if status is not None:  # the Hub's own words (e.g. 'Repository not found') say more than '404 Client Error'
        return "--push_to_hub", f"{endpoint} answered {status}: {first_line(getattr(e, 'server_message', None) or e)}"
    if is_network_error(e):
        return "--push_to_hub", f"cannot reach the Hub at {endpoint} ({first_line(e)})"
    return "--push_to_hub", first_line(e)


def prepare_repo(hub_model_id, output_dir, token):
    """Create the repo, or find one of ours, before training (main process only). Returns 'namespace/name'."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)  # made here, not at import: it copies the endpoint (HF_ENDPOINT) in use now
    wanted = hub_model_id or default_repo_name(output_dir)
    try:
        me = api.whoami()  # a bad token fails here, before anything is created
        namespace = wanted.split("/")[0] if "/" in wanted else me["name"]
        mine = [me["name"]] + [org["name"] for org in me.get("orgs") or []]
        if namespace not in mine:  # create_repo(exist_ok=True) quietly accepts someone else's public repo
            raise UsageError(f"--hub_model_id {wanted}: the namespace '{namespace}' is not yours (the token belongs to "
                             f"'{me['name']}'); use --hub_model_id {me['name']}/{wanted.split('/')[-1]} or one of "
                             f"your organizations ({', '.join(mine[1:]) or 'none'})")
        return api.create_repo(wanted, exist_ok=True).repo_id
    except UsageError:
        raise
    except Exception as e:  # one line whatever went wrong: nothing has been trained yet, fixing is cheap
        flag, what = explain(e, api.endpoint)
        fix = {"--hub_token": TOKEN_FIX}.get(flag, "check the network and HF_ENDPOINT, or drop --push_to_hub "
                                                   "and upload output_dir later with `hf upload`")
        raise UsageError(f"{flag}: {what} while preparing {wanted}; {fix}") from None


def retry_command(output_dir, repo_id, token, ignore=IGNORE):
    """The `hf upload` line that does what upload_run does; the token itself is never printed."""
    words = ["hf", "upload", repo_id, output_dir, "."]
    for pattern in ignore:
        words += ["--exclude", pattern]
    words += ["--commit-message", COMMIT_MESSAGE]
    command = " ".join(shlex.quote(w) for w in words)
    return command + (" --token YOUR_HUB_TOKEN" if token else "")


def upload_run(output_dir, repo_id, token, *, extra_ignore=()):
    """Upload output_dir (minus IGNORE and extra_ignore) in one commit. Returns (ok, one-line message); never raises.

    extra_ignore: more patterns relative to output_dir, e.g. a --logging_dir that is not 'logs'.
    """
    if not os.path.isdir(output_dir):  # otherwise the message below would say the files are still there
        return False, f"--push_to_hub: nothing to upload to {repo_id}: {output_dir} is not a folder"
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    ignore = list(IGNORE) + list(extra_ignore)
    try:  # a copy of the list: upload_folder appends its own patterns to the one it gets
        api.upload_folder(repo_id=repo_id, folder_path=output_dir, commit_message=COMMIT_MESSAGE,
                          ignore_patterns=list(ignore))
    except Exception as e:  # the run is done and on disk: report and let the caller choose the exit code
        _, what = explain(e, api.endpoint)
        return False, (f"--push_to_hub: upload to {repo_id} failed: {what}; nothing was deleted, the files are still "
                       f"in {output_dir}; retry with: {retry_command(output_dir, repo_id, token, ignore)}")
    return True, f"uploaded {output_dir} to {api.endpoint}/{repo_id}"
