"""``python -m cli``: the ``kface`` command."""

from cli.main import main

main()
