"""What can go wrong in a cosconvert run, each kind with the exit code the command line gives it.

Exit codes: 0 success; 1 the ONNX file failed validation; 2 bad input (a missing, corrupt or
untrusted file, a wrong architecture, a shape or data the model does not take); 3 the output
folder cannot be written; 4 an unexpected internal error; 5 validation inconclusive; 130
interrupted.
"""

from __future__ import annotations

VALIDATION_FAILED, BAD_INPUT, OUTPUT_UNWRITABLE, INTERNAL, INCONCLUSIVE, INTERRUPTED = 1, 2, 3, 4, 5, 130


class CosconvertError(Exception):
    """One clear line for the user (what is wrong and what to do), and its exit code."""

    code = INTERNAL

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class InputError(CosconvertError, ValueError):
    """The model, its inputs, the data or an option do not fit."""

    code = BAD_INPUT


class OutputError(CosconvertError, OSError):
    """The output folder cannot be written."""

    code = OUTPUT_UNWRITABLE


class Interrupted(CosconvertError):
    """Ctrl-C: what was kept, and how to go on."""

    code = INTERRUPTED


def first_line(err: BaseException, with_type: bool = False) -> str:
    """The first line of an error's message (exceptions from torch run to pages), with its type if asked."""
    text = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {text}" if with_type else text
