"""`python -m vgg_flax.cli ...`: the `vgg-flax` command."""

import sys

from vgg_flax.cli.main import main

sys.exit(main())
