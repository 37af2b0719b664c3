"""How a command ends when something goes wrong: one line, never a traceback, unless asked for.

Every module raises UsageError for a problem the user can fix (a flag, a file, a model, the network);
`run_cli` turns it into `prog: error: <message>` and exit code 2. Anything else is a bug: one line
saying so, how to get the traceback and where to report it (`--debug` or DREAMBOOTH_DEBUG=1).
Stdlib only: imported before the flags are read, so `--help` and flag errors stay instant.
"""
import errno
import os
import sys

from .redaction import scrub

DEBUG_ENV = "DREAMBOOTH_DEBUG"


class UsageError(Exception):
    """A bad flag or input file: printed as one line, exit code 2, nothing written."""


# An OSError with one of these on a named file is the machine's state, not a bug: a folder turned read-only (or a
# read-only mount), a full disk or quota. The user fixes it and runs again.
USER_FIXABLE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def os_error_line(e):
    """One line for a user-fixable OSError, or None for any other (a bug)."""
    if e.errno not in USER_FIXABLE_ERRNOS or not e.filename:
        return None
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"cannot write {e.filename}: {e.strerror}; free space on that disk, then run the same command again"
    if e.errno == errno.EROFS:
        return (f"cannot write {e.filename}: {e.strerror}; choose a folder on a writable disk, then run the same "
                "command again")
    return (f"{e.filename}: {e.strerror}; fix the permissions of that file or folder (or choose another), then run "
            "the same command again")


def debug_requested(argv):
    """--debug anywhere on the command line, or DREAMBOOTH_DEBUG=1: show full tracebacks."""
    return "--debug" in (argv or []) or os.environ.get(DEBUG_ENV, "") not in ("", "0", "false", "no")


def first_line(exc):
    """The first non-empty line of an exception's message (library messages run to paragraphs)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def run_cli(prog, main, argv=None):
    """Call main(argv) and turn every way out into an exit code and at most one line on stderr."""
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = debug_requested(argv)
    try:
        return main(argv)
    except UsageError as e:
        if debug:
            raise
        print(f"{prog}: error: {scrub(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # raised with a message where there is something to say (what was kept)
        if debug:
            raise
        print(f"\n{prog}: {scrub(e.args[0]) if e.args else 'interrupted'}", file=sys.stderr)
        return 130
    except Exception as e:  # a bug: keep the line short, say how to get the details
        if debug:
            raise
        line = os_error_line(e) if isinstance(e, OSError) else None
        if line:
            print(f"{prog}: error: {scrub(line)}", file=sys.stderr)
            return 2
        print(f"{prog}: internal error: {type(e).__name__}: {scrub(first_line(e))} -- this is a bug: rerun the same "
              f"command with --debug (or {DEBUG_ENV}=1) and report it with that traceback "
              "(docs/troubleshooting.md, 'Reporting a bug')", file=sys.stderr)
        return 1
