"""The commands' mistakes as one line on stderr and exit status 2; `--debug` keeps the traceback.

A user who gives a missing file, a file that is not an image or not a weights file, an unknown
model or dataset name or a bad config value needs the sentence that names it, not a traceback. The
project's own errors are those classes: ValueError and KeyError (bad values and unknown names, with
the valid ones listed; ConversionError, WeightsMismatchError and PIL's UnidentifiedImageError are
among them), OSError (missing and unreadable files), RuntimeError subclasses of this project
(CheckpointError, WorkdirLockedError) and a non-finite loss. Anything else is a bug and keeps its
traceback. UserWarnings are one line too (`prog: warning: MESSAGE`), not Python's two lines with
the source line that raised them.
"""

from __future__ import annotations

import functools
import sys
import warnings
from collections.abc import Callable

from vgg_flax.train import errors as train_errors

EXIT_USAGE = 2
USER_ERRORS = (ValueError, KeyError, OSError, *train_errors.USER_ERRORS)


def one_line(err: BaseException) -> str:
    """The error's message on one line (a KeyError's message without the quotes str() adds)."""
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        text = err.args[0]
    elif isinstance(err, OSError) and err.strerror and err.filename and len(err.args) <= 2:
        text = f"{err.strerror}: {err.filename}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


def report(prog: str, err: BaseException) -> int:
    """Prints `prog: error: MESSAGE` on stderr; returns the exit status."""
    print(f"{prog}: error: {one_line(err)}", file=sys.stderr, flush=True)
    return EXIT_USAGE


def run_command(prog: str, fn: Callable[[], int], *, debug: bool) -> int:
    """`fn()`'s exit status, or one line and status 2 for a user error (re-raised under `debug`);
    its UserWarnings one line each (Python's own format under `debug`)."""
    default = warnings.formatwarning
    if not debug:
        warnings.formatwarning = functools.partial(_format_warning, prog, default)
    try:
        return fn()
    except USER_ERRORS as err:
        if debug:
            raise
        return report(prog, err)
    finally:
        warnings.formatwarning = default


def _format_warning(prog, default, message, category, filename, lineno, line=None) -> str:
    """`prog: warning: MESSAGE` for the warnings users act on (UserWarning: what this project and
    its libraries tell the user); other categories keep Python's format."""
    if issubclass(category, UserWarning):
        return f"{prog}: warning: {' '.join(str(message).split())}\n"
    return default(message, category, filename, lineno, line)
