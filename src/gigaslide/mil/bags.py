"""Slides' tile features as MIL bags, held in memory only up to a budget.

A cohort of thousands of slides does not fit in memory as float32 bags (1,000 slides x 10,000 tiles x
1,024-d is 41 GB). :class:`Bags` reads a slide's features from its file when the bag is first used and
keeps it while the bags kept so far fit in ``budget_bytes``; bags beyond the budget are read from disk at
every use (as CLAM's training loop does). Bags are never evicted: under the random order of MIL epochs an
LRU cache smaller than the cohort would miss on almost every read, while a fixed resident set serves a
``budget / cohort`` share of all reads from memory. What a model sees does not depend on the budget.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from gigaslide.errors import GigaslideError
from gigaslide.features.stats import nonfinite_rows
from gigaslide.memory import available_memory, malloc_trim, rss_bytes

#: Share of the memory available at start that ``budget="auto"`` lets bags take.
AUTO_SHARE = 0.5
#: Memory beyond the kept bags before free heap pages are handed back: this many of the largest bag, at least SLACK_MIN.
SLACK_BAGS, SLACK_MIN = 8, 512 << 20


def resolve_budget(budget_gb: float | str | None) -> int:
    """``"auto"`` / None: :data:`AUTO_SHARE` of the available memory (unlimited where unknown); a number: GB."""
    if budget_gb in (None, "auto"):
        avail = available_memory()
        return int(avail * AUTO_SHARE) if avail is not None else 1 << 62
    try:
        gb = float(budget_gb)
    except (TypeError, ValueError):
        raise GigaslideError(f"bag memory budget {budget_gb!r}", fix="give GB as a number (0 = read every bag "
                             "from disk at each use) or auto") from None
    if not gb >= 0:
        raise GigaslideError(f"bag memory budget {budget_gb!r} GB", fix="give 0 or more GB, or auto")
    return int(min(gb * 1e9, 1 << 62))  # inf (no limit) was an OverflowError


class Bags(Sequence[torch.Tensor]):
    """``bags[i]``: the float32 ``[N, D]`` tensor of slide ``i``'s features (``files[i].features``, an array or a
    :class:`~gigaslide.features.store.LazyFeatures`), kept in memory while the kept bags fit in ``budget_bytes``.

    Kept bags stay in their stored dtype (a float16 file costs half) and are converted when used.
    """

    def __init__(self, files: Sequence[Any], budget_bytes: int):
        self._files = list(files)
        self.budget_bytes = int(budget_bytes)
        self._kept: dict[int, np.ndarray] = {}
        self.kept_bytes = 0
        self.reads = 0  # bag reads from disk (a kept bag is read once)
        self.trims = 0  # times the process was over its bound and malloc's free pages were handed back
        sizes = [self.nbytes(i) for i in range(len(self._files))]
        self.total_bytes = sum(sizes)
        largest = max(sizes, default=0)
        #: memory beyond the kept bags that a training step may use (the model, a bag, its temporaries) before
        #: malloc's free pages are handed back (see :mod:`gigaslide.memory`)
        self.slack_bytes = max(SLACK_MIN, SLACK_BAGS * largest)
        self._rss0 = rss_bytes()

    def __len__(self) -> int:
        return len(self._files)

    def cells(self, i: int) -> np.ndarray | None:
        """Slide ``i``'s tiles on its tiling grid (:meth:`~gigaslide.features.store.FeatureFile.grid_cells`), for
        models that see the layout."""
        return self._files[int(i)].grid_cells()

    def path(self, i: int) -> Any:
        """Slide ``i``'s feature file (for messages)."""
        return self._files[int(i)].path

    def nbytes(self, i: int) -> int:
        f = self._files[i].features
        return int(f.nbytes)

    def _array(self, i: int) -> np.ndarray:
        a = self._kept.get(i)
        if a is not None:
            return a
        f = self._files[i].features
        if isinstance(f, np.ndarray):  # already in memory (an eager load): nothing to read or keep
            return f
        self.reads += 1
        if self.kept_bytes + f.nbytes > self.budget_bytes:
            return f.read()
        # kept bags in memory of their own, not in the C heap, where long-lived blocks would split the holes that
        # the steps' short-lived blocks of the same size reuse
        a = f.read(own_mapping=True)
        self._kept[i] = a
        self.kept_bytes += a.nbytes
        return a

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        if not isinstance(i, (int, np.integer)):
            raise TypeError("Bags are indexed by one int; use take() for a subset")
        i = int(i)
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        self._bound()
        return torch.from_numpy(np.asarray(self._array(i % len(self)), dtype=np.float32))

    def _bound(self) -> None:
        """Keep the process within its start + the kept bags + the slack: bags of tens of MB allocated and freed
        step after step, between small blocks that outlive them, otherwise grow a process by about one bag per
        bag used (measured without this bound: +1.6 GB from 75 to 150 slides, no bag kept)."""
        if self._rss0 is None:
            return
        now = rss_bytes()
        if now is not None and now > self._rss0 + self.kept_bytes + self.slack_bytes and malloc_trim():
            self.trims += 1

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]

    def verify(self, rows: int = 8192) -> None:
        """Read every bag once and refuse, in one line naming their files, those that cannot be read (a damaged
        chunk fails its checksum only when read) or hold NaN / inf features: before any training, not after hours
        of it, when a fold reaches its test slides. Bags that fit the budget are kept on the way (they are read
        anyway); the others cost one extra read. ``rows``: tiles checked at a time (bounds the temporaries)."""
        bad: list[tuple[int, GigaslideError]] = []
        for i in range(len(self)):
            try:
                a = self._array(i)
            except GigaslideError as e:
                bad.append((i, e))
                continue
            n_bad = nonfinite_rows(a, rows)
            if n_bad:
                bad.append((i, GigaslideError(f"{n_bad} tile(s) have NaN/inf features", path=self.path(i),
                                              fix="re-encode that slide (the encoder overflowed: try fp32) or "
                                                  "remove its file")))
        if len(bad) == 1:
            raise bad[0][1]
        if bad:
            listed = "; ".join(f"{getattr(self.path(i), 'name', self.path(i))}: {e.what}" for i, e in bad[:5])
            more = f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""
            folder = getattr(self.path(bad[0][0]), "parent", None)
            raise GigaslideError(f"{len(bad)} feature files cannot be used: {listed}{more}", path=folder,
                                 fix="re-encode those slides (`gigaslide encode` redoes damaged files) or remove "
                                     "their files")

    def take(self, indices: Sequence[int] | np.ndarray) -> BagSubset:
        """The bags at ``indices``, sharing this set's memory (a fold's train / val / test slides)."""
        return BagSubset(self, [int(i) for i in indices])

    def stats(self) -> dict[str, Any]:
        """What was kept: for run.json and logs."""
        return {"bags": len(self), "bytes": self.total_bytes, "kept_bags": len(self._kept), "kept_bytes": self.kept_bytes,
                "budget_bytes": self.budget_bytes, "reads": self.reads, "slack_bytes": self.slack_bytes,
                "trims": self.trims}


class BagSubset(Sequence[torch.Tensor]):
    """Some of a :class:`Bags`' bags, in a given order."""

    def __init__(self, bags: Bags, indices: list[int]):
        self._bags, self._indices = bags, indices

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, i: int) -> torch.Tensor:  # type: ignore[override]
        return self._bags[self._indices[i]]

    def __iter__(self) -> Iterator[torch.Tensor]:
        for j in self._indices:
            yield self._bags[j]

    def cells(self, i: int) -> np.ndarray | None:
        return self._bags.cells(self._indices[i])

    def path(self, i: int) -> Any:
        return self._bags.path(self._indices[i])


def budget_note(bags: Bags) -> str:
    """One line for the log, before training: whether every bag fits in the budget."""
    total = bags.total_bytes
    if total <= bags.budget_bytes:
        return f"bags: {len(bags)} slides, {total / 1e9:.2f} GB, all kept in memory"
    return (f"bags: {len(bags)} slides, {total / 1e9:.2f} GB, over the {bags.budget_bytes / 1e9:.2f} GB bag budget: "
            f"those that fit are kept in memory, the others read from disk at every use (--bag-memory-gb)")
