"""`python -m plproxy` is the `plproxy` command."""

from plproxy.cli import main

raise SystemExit(main())
