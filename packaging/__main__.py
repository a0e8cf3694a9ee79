"""Entry point for ``python -m spaps_client`` when the client is installed as a package."""

from spaps_client import main

raise SystemExit(main())
