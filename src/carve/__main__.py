"""`python -m carve ...` (and `torchrun --nproc-per-node N -m carve extract ...`): the carve CLI."""

import sys

from carve.cli.main import main

sys.exit(main())
