"""`python -m parrot.service ...` is the same as the `parrot` command."""

from parrot.service.cli import app

app()
