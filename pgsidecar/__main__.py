from __future__ import annotations

import sys

from pgsidecar.cli import main

sys.exit(main())
