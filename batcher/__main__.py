"""`python -m batcher`: the same command as `batcher`."""

import sys

from batcher.cli import main

sys.exit(main())
