"""`python -m studio ...`: see studio/cli.py."""

from studio.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
