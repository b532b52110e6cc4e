"""``python -m supervisor`` is the ``sockvisor`` command."""

from supervisor.cli import main

raise SystemExit(main())
