"""``python -m rawdelta``: the same command as the ``rawdelta`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
