"""`python -m embedsvc.cli`: the same as the `embedsvc` console script."""

import sys

from embedsvc.cli import main

sys.exit(main())
