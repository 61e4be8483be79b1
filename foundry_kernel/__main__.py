"""``python -m foundry_kernel ...`` is the ``foundry`` command (for launchers such as
``torchrun -m foundry_kernel distill``, which run a module, not a console script)."""

import sys

from foundry_kernel.cli import main

if __name__ == "__main__":
    sys.exit(main())
