"""`python -m wdmjax.cli ...` runs the `wdmjax` command."""

import sys

from wdmjax.cli import main

sys.exit(main())
