"""`python -m nanoseek …` (and `torchrun -m nanoseek …`) is the `nanoseek` command."""
import sys

from nanoseek.cli import main

if __name__ == "__main__":  # guarded: spawn-context workers re-import the main module
    sys.exit(main())
