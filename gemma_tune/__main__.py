"""`python -m gemma_tune ...` is the `gemma-tune` command."""

import sys

from gemma_tune.cli import main

sys.exit(main())
