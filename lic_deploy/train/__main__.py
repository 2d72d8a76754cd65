"""`python -m lic_deploy.train ARGS` is `lic-deploy train ARGS`: the form torchrun starts, one process per GPU:

    torchrun --nproc_per_node 4 -m lic_deploy.train --device cuda --data DIR --batch 32 -o run.pt
"""

import sys

from lic_deploy.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
