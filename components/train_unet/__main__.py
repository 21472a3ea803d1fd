"""`python -m components.train_unet ...` = `t2i train ...`, for launchers that take a
module: `accelerate launch --num_processes N -m components.train_unet --params ...`."""

import sys

from components.cli import main

sys.exit(main(["train", *sys.argv[1:]]))
