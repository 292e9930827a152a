"""One exception type for every user-facing failure.

A :class:`GigaslideError` carries a one-line message that names the file (or value) at fault
and says how to fix it. The CLI prints ``error: <message>`` and exits non-zero; it never shows a
library traceback for bad input.
"""

from __future__ import annotations

import os


class GigaslideError(Exception):
    """A user-facing error: ``what`` went wrong with ``path`` and ``fix`` says what to do."""

    def __init__(self, what: str, *, path: str | os.PathLike | None = None, fix: str | None = None):
        self.what = what
        self.path = None if path is None else os.fspath(path)
        self.fix = fix
        super().__init__(self.one_line())

    def one_line(self) -> str:
        parts = [f"{self.path}: {self.what}" if self.path else self.what]
        if self.fix:
            parts.append(f"fix: {self.fix}")
        return " -- ".join(parts).replace("\n", " ")


def check_finite_loss(loss, at: str, run: str | os.PathLike, *,  # noqa: ANN001
                      fix: str = "lower --lr; the last good checkpoint is kept and a re-run resumes from it") -> None:
    """Stop a training run whose loss became NaN/inf, with ``fix`` (default: the last checkpoint is kept)."""
    import math

    value = float(loss.detach() if hasattr(loss, "detach") else loss)
    if not math.isfinite(value):
        raise GigaslideError(f"loss became {value} at {at}", path=run, fix=fix)


def nonfinite_weights(model) -> list[str]:  # noqa: ANN001
    """The names of ``model``'s floating tensors holding NaN/inf: a module's ``state_dict()`` (parameters *and*
    buffers such as BatchNorm's running statistics) or a mapping of named tensors."""
    import torch

    named = model.state_dict() if hasattr(model, "state_dict") else model
    return [k for k, v in named.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_finite_weights(model, at: str, run: str | os.PathLike, *,  # noqa: ANN001
                         fix: str = "lower --lr; the last good checkpoint is kept and a re-run resumes from it",
                         then: str = "no checkpoint was written") -> None:
    """Stop before a model whose weights became NaN/inf (:func:`nonfinite_weights`) is checkpointed, exported or
    used, with the count, the first bad tensor's name and ``then`` (what was not done) in the one line."""
    bad = nonfinite_weights(model)
    if bad:
        raise GigaslideError(f"{len(bad)} weight tensor(s) became NaN/inf by {at} (the first: {bad[0]}); {then}",
                             path=run, fix=fix)
