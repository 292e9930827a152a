"""The precision names every command takes (``--precision``), without torch: the command line is checked before any
stage runs, and commands that never need torch (``gigaslide tile``, ``info``) must not pay its import (about 2 s
of CPU). What each name means: :mod:`gigaslide.devices`."""

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

__all__ = ["PRECISIONS"]
