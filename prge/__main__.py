"""`python -m prge ...` is the `prge` command (what `torchrun -m prge` launches)."""

from prge.cli import main

raise SystemExit(main())
