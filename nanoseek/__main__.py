"""`python -m nanoseek …` (and `torchrun -m nanoseek …`) is the `nanoseek` command."""
import sys

from nanoseek.cli import main

sys.exit(main())
