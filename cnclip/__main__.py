"""`python -m cnclip`: the same as the `cnclip` command."""

import sys

from cnclip.app.cli import main

sys.exit(main())
