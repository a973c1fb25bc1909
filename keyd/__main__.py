"""python -m keyd"""

from keyd.cli import main

raise SystemExit(main())
