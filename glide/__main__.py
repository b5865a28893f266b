"""`python -m glide` is the `glidefs` command."""

from glide.cli.main import main

raise SystemExit(main())
