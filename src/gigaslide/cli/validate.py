"""Central checks of command-line values, by option name, for every command (before it runs).

A command's typed signature already makes jsonargparse refuse wrong types; these rules refuse the
values that type-check but cannot work (``--batch-size 0``, ``--mpp -1``, ``--lr 1e400`` = inf,
``--min-tissue 2``): one :class:`GigaslideError` line naming the option and a working value, instead
of a traceback from deep inside a stage. Rules go by parameter name, so a new command gets them
for free; a name not listed is only checked for finiteness (floats) and size (ints).
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from gigaslide.errors import GigaslideError
from gigaslide.precisions import PRECISIONS
from gigaslide.safe_parse import is_number

#: Integers that must be >= 1.
AT_LEAST_ONE = frozenset({
    "batch_size", "tile_size", "epochs", "steps", "folds", "views", "tiles_per_view", "ensemble", "prototypes",
    "image_size", "region_size", "out_dim", "hidden", "k", "fewshot_repeats", "repeats", "train_slides", "limit",
    "max_train", "max_tiles", "max_tiles_per_class", "slides", "grid", "devices", "threads", "accumulate",
    "thumb_size", "max_tiles_per_slide", "tiles_per_slide", "n_tiles", "size", "crop", "crop_size",
    "steps_per_epoch",
})
#: Integers that must be >= 0.
NON_NEGATIVE = frozenset({
    "workers", "overlap", "seed", "bootstrap", "patience", "freeze_epochs", "warmup", "fold", "mosaic_slides", "n_local",
    "checkpoint_every_steps", "level", "tile_workers", "monitor_every",
})
#: Floats that must be > 0.
POSITIVE = frozenset({"mpp", "region_mpp", "lr", "head_lr", "temperature", "max_gb", "slide_mpp", "scale", "tile_mpp",
                      "image_mpp"})
#: Floats that must be >= 0.
NON_NEGATIVE_FLOAT = frozenset({"trunk_lr", "weight_decay", "dropout_rate", "patch_embed_lr_mult"})
#: Floats in [0, 1].
FRACTION = frozenset({"min_tissue", "positive_fraction", "layer_decay", "dropout", "fraction", "val_fraction",
                      "warmup_frac", "drop_path"})
#: Strings with a closed set of values.
CHOICES: dict[str, tuple[str, ...]] = {"background": ("auto", "bright", "dark"), "precision": PRECISIONS}
#: Larger integers overflow torch / numpy (seeds, sizes) deep inside a stage.
MAX_INT = 2**31 - 1
#: An example value for the fix line when the option's default cannot serve as one.
EXAMPLES = {"batch_size": 64, "tile_size": 224, "epochs": 10, "steps": 100, "folds": 5, "mpp": 0.5, "lr": 0.001,
            "threads": 2, "workers": 1, "seed": 0, "slide_mpp": 0.25, "image_mpp": 0.25}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _example(name: str, default: Any) -> str:
    good = EXAMPLES.get(name, default)
    if good is None or good is inspect.Parameter.empty or isinstance(good, bool):
        good = 1 if name in AT_LEAST_ONE | POSITIVE else 0  # a value the same checks accept
    return f"use e.g. {_flag(name)} {good}"


def _check_number(name: str, v: Any, default: Any) -> None:
    def bad(what: str) -> GigaslideError:
        return GigaslideError(f"{_flag(name)} {v!r} {what}", fix=_example(name, default))

    if isinstance(v, bool):
        return
    if isinstance(v, float):
        if not math.isfinite(v):
            raise bad("is not a finite number")
        if name in POSITIVE and not v > 0:
            raise bad("must be positive")
        if name in NON_NEGATIVE_FLOAT and v < 0:
            raise bad("must not be negative")
        if name in FRACTION and not 0.0 <= v <= 1.0:
            raise bad("must be between 0 and 1")
        if name in AT_LEAST_ONE | NON_NEGATIVE and (v < 0 or v > MAX_INT):
            raise bad(f"must be between 0 and {MAX_INT}")
    elif isinstance(v, int):
        if abs(v) > MAX_INT:
            raise bad(f"is too large (at most {MAX_INT})")
        if name in AT_LEAST_ONE and v < 1:
            raise bad("must be at least 1")
        if (name in NON_NEGATIVE or name in POSITIVE) and v < 0:
            raise bad("must not be negative")
        if name in POSITIVE and v == 0:
            raise bad("must be positive")
        if name in FRACTION and not 0 <= v <= 1:
            raise bad("must be between 0 and 1")


def check_options(func: Callable[..., Any], kwargs: dict[str, Any]) -> None:
    """Raise a one-line :class:`GigaslideError` for the first value no command could use."""
    params = inspect.signature(func).parameters
    for name, v in kwargs.items():
        default = params[name].default if name in params else None
        values: Sequence[Any] = v if isinstance(v, (list, tuple)) else [v]
        for item in values:
            if isinstance(item, str) and name in POSITIVE and is_number(item) and not float(item) <= 0:
                item = float(item)  # "inf" / "nan" / "1e-7" of a str option (--slide-mpp: a number or a CSV path)
            if isinstance(item, (int, float)):
                _check_number(name, item, default)
                if name == "slide_mpp" and not isinstance(item, bool):  # once, not once per slide
                    from gigaslide.slides.mpp import check_override

                    check_override(float(item), _flag(name))
            elif isinstance(item, str):
                if "\x00" in item:
                    raise GigaslideError(f"{_flag(name)} contains a NUL character", fix="pass a plain path or value")
                if name in CHOICES and item not in CHOICES[name]:
                    raise GigaslideError(f"{_flag(name)} '{item}' is not one of {', '.join(CHOICES[name])}",
                                         fix=f"use e.g. {_flag(name)} {CHOICES[name][0]}")


def json_object(flag: str, text: str | None, example: str) -> dict[str, Any]:
    """The JSON object an option like ``--model-args`` holds ({} when not given), or a one-line error naming
    ``flag`` with ``example`` as the fix."""
    try:
        value = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise GigaslideError(f"{flag} {text!r} is not JSON ({e.msg})", fix=f"give a JSON object, e.g. '{example}'") from None
    if not isinstance(value, dict):
        raise GigaslideError(f"{flag} {text!r} must be a JSON object", fix=f"give a JSON object, e.g. '{example}'")
    return value


def parse_error_line(message: str, command: str, positionals: Iterable[str] = ()) -> GigaslideError:
    """jsonargparse's (multi-line) message about the command line -> one line with a fix. Missing arguments are named
    as ``--help`` shows them (``SLIDES, --out``; jsonargparse says ``encode.slides, encode.out``); ``positionals``: the
    names taken from positional values."""
    import re

    text = " ".join(ln.strip() for ln in str(message).splitlines() if ln.strip())
    pos = set(positionals)
    text = re.sub(r"(arguments are required: )(.*)$", lambda m: m.group(1) + ", ".join(
        (k.upper() if k in pos else _flag(k)) for k in (a.strip().split(".")[-1] for a in m.group(2).split(","))),
        text)
    text = re.sub(r'Parser key "([a-z0-9_.]+)"', lambda m: _flag(m.group(1).split(".")[-1]), text)
    text = text.replace("<class '", "").replace("'>", "")
    if len(text) > 300:
        text = text[:297] + "..."
    where = f"gigaslide {command}".strip()
    return GigaslideError(f"{where}: {text or 'invalid command line'}", fix=f"see `{where} --help`")


def tiling_params(mpp: float, tile_size: int, overlap: int, min_tissue: float, background: str,
                  tissue_from: str | None, tissue_classes: str | None,
                  tissue_detect: bool = False):  # noqa: ANN201 - TilingParams (lazy import)
    """The command line's tiling settings; ``--tissue-from`` must be a folder (checked before any slide is opened),
    ``--tissue-classes`` is comma-separated (``Tumor,Stroma``); ``--tissue-detect`` detects inside the annotations."""
    from gigaslide.tiling import TilingParams

    if tissue_from is not None and not Path(tissue_from).is_dir():
        raise GigaslideError("--tissue-from is not a folder", path=tissue_from,
                             fix="pass the folder holding one <slide_id>.geojson per slide")
    if tissue_classes is not None and tissue_from is None:
        raise GigaslideError("--tissue-classes picks annotation classes, which needs --tissue-from",
                             fix="add --tissue-from FOLDER, or leave out --tissue-classes")
    if tissue_detect and tissue_from is None:
        raise GigaslideError("--tissue-detect detects tissue inside annotations, which needs --tissue-from",
                             fix="add --tissue-from FOLDER, or leave out --tissue-detect (tissue is detected by default)")
    classes = tuple(c.strip() for c in tissue_classes.split(",") if c.strip()) if tissue_classes else ()
    return TilingParams(mpp, tile_size, overlap, min_tissue, background, tissue_from, classes or None, bool(tissue_detect))


__all__ = ["AT_LEAST_ONE", "CHOICES", "FRACTION", "MAX_INT", "NON_NEGATIVE", "POSITIVE", "check_options", "json_object",
           "parse_error_line", "tiling_params"]
