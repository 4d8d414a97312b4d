"""`python -m lightning_unlearn.cli`: the `lightning-unlearn` command."""

from . import main

if __name__ == "__main__":
    main()
