"""`python -m lic_deploy ...` is `lic-deploy ...` (for machines where the console script is not installed)."""

import sys

from lic_deploy.cli import main

sys.exit(main())
