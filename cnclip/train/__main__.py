"""`python -m cnclip.train` (what torchrun launches): the same as `cnclip train`."""

import sys

from cnclip.train.main import main

sys.exit(main())
