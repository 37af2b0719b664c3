"""docs/flags.md, written from the parser itself so the reference can never drift from the flags (a test
compares the file with this output). Stdlib only.

    python -m dreambooth.flagdoc > docs/flags.md
"""
import argparse
import sys


def _default(action):
    if isinstance(action, argparse.BooleanOptionalAction) and action.default is None:
        return "auto"
    if action.default is None or action.default == []:
        return "—"
    if action.default is False:
        return "off"
    if action.default is True:
        return "on"
    return str(action.default)


def flags_markdown(parser):
    lines = ["# Every flag of train_dreambooth_lora.py", "",
             "Generated from the parser (`python -m dreambooth.flagdoc > docs/flags.md`; a test keeps it in sync). "
             "Every on/off flag also has a `--no-...` form. A `--config` YAML/TOML file takes the same names without "
             "`--`. Flags of one model family (SD 3's `--weighting_scheme`, SDXL's crop corner, the DDPM "
             "`--snr_gamma`) are refused with one line on the others; \"the family's\" defaults are listed in "
             "[families.md](families.md).", ""]
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.option_strings and a.dest != "help"]
        if not actions:
            continue
        lines += [f"**{group.title}**", "", "| flag | default | meaning |", "| --- | --- | --- |"]
        for action in actions:
            text = " ".join((action.help or "").split()).replace("|", "\\|")
            lines.append(f"| `{action.option_strings[0]}` | {_default(action).replace('|', chr(92) + '|')} | {text} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    from .config import build_parser
    sys.stdout.write(flags_markdown(build_parser()))
