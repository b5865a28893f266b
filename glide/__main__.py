"""`python -m glide` is the `glidefs` command."""

from glide.cli import main

raise SystemExit(main())
