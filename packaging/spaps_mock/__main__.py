"""Entry point for ``python -m spaps_mock`` when the emulator is installed as a package."""

from spaps_mock import main

raise SystemExit(main())
