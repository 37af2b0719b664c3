"""The Hub token never reaches a file the run writes or uploads, however it was given.

A token can come as `--hub_token T`, `--hub_token=T`, an abbreviation argparse accepts for it (`--hub_tok T`,
`--hub_t=T`), a --config file's `hub_token:` key, or the environment (HF_TOKEN). Redacting the command line by
the flag's exact spelling misses most of these, so every value known to be a token is remembered here and
scrubbed by value from what is written: the model card's command line, config.yaml, train_stats.json, checkpoint
settings, safetensors headers, tracker configs and the one-line errors. Stdlib only: the flag checks use it.
"""
import os

TOKEN_FLAG = "--hub_token"
ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # what huggingface_hub reads
PLACEHOLDER = "HUB_TOKEN"
# Shorter values are not scrubbed: they would be replaced inside ordinary words of the files (no real token is
# this short; Hub tokens are hf_ and 34 characters more).
MIN_LENGTH = 6

_known = set()


def is_token_option(word):
    """`--hub_token` or any abbreviation argparse resolves to it (the other --hub_* flag differs from `--hub_t`
    on), with or without `=value`; or a misspelling of it (`--hub-token`, `--hub_tokn`), whose value argparse's
    'unrecognized arguments' line would otherwise echo."""
    name = word.split("=", 1)[0]
    if not name.startswith("--"):
        return False
    if len(name) > len("--hub_") and TOKEN_FLAG.startswith(name):
        return True
    import difflib
    return difflib.SequenceMatcher(None, name.lower(), TOKEN_FLAG).ratio() >= 0.85


def remember(*values):
    """Values to scrub from everything written from now on in this process."""
    for value in values:
        if isinstance(value, str) and len(value.strip()) >= MIN_LENGTH:
            _known.add(value)
            _known.add(value.strip())


def remember_from_argv(argv):
    """The token values on a command line, in any spelling argparse takes, and those in the environment."""
    argv = list(argv)
    for i, word in enumerate(argv):
        if is_token_option(word):
            remember(word.split("=", 1)[1] if "=" in word else (argv[i + 1] if i + 1 < len(argv) else None))
    remember(*(os.environ.get(var) for var in ENV_VARS))


def scrub(text):
    """text with every remembered token replaced by HUB_TOKEN (the longest first, so none leaves a tail)."""
    if not isinstance(text, str):
        return text
    for value in sorted(_known, key=len, reverse=True):
        text = text.replace(value, PLACEHOLDER)
    return text


def scrub_values(mapping):
    """A dict (a safetensors header, a tracker config) with its string keys and values scrubbed."""
    return {scrub(k): scrub(v) for k, v in mapping.items()}


def redact_argv(argv):
    """The command line for the model card: the token flag's value replaced in every spelling, then every
    remembered token value scrubbed from every word (a token pasted into another flag is caught too)."""
    out, hide = [], False
    for word in argv:
        if hide:
            out.append(PLACEHOLDER)
        elif is_token_option(word) and "=" in word:
            out.append(word.split("=", 1)[0] + "=" + PLACEHOLDER)
        else:
            out.append(scrub(word))
        hide = is_token_option(word) and "=" not in word
    return out
