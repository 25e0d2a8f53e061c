"""`python -m cnclip`: the same as the `cnclip` command."""

from cnclip.app.cli import run

run()
