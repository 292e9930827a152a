"""``python -m gigaslide ...`` (also ``torchrun --nproc-per-node N -m gigaslide encode ...``): the ``gigaslide`` command."""

from gigaslide.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main())
