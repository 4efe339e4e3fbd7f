"""Entry point for ``python -m uoomd``."""

from uoomd.cli import main

raise SystemExit(main())
