"""`python -m palm_net.cli`: the `palm` command."""

import sys

from palm_net.cli import main

sys.exit(main())
