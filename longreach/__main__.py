"""``python -m longreach``: the ``longreach`` command."""

from longreach.cli import main

raise SystemExit(main())
