"""`python -m zokern ...`, e.g. under `torchrun --nproc-per-node N -m zokern finetune ...`."""
import sys

from zokern.cli import main

sys.exit(main())
