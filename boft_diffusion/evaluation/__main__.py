"""``python -m boft_diffusion.evaluation``: see ``cli.py``."""

import sys

from .cli import main

try:
    main()
except (ValueError, OSError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
