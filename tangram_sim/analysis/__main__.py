"""`python -m tangram_sim.analysis RUN_DIR`: see `tangram_sim.analysis.schedule`."""

import sys

from tangram_sim.analysis.schedule import main

sys.exit(main())
