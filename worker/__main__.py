"""`python -m worker` is the same as the `linkworker` command."""

from worker.cli import main

raise SystemExit(main())
