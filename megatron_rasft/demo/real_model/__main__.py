"""`python -m megatron_rasft.demo.real_model`: the real-model run (`run.py`)."""
import sys

from megatron_rasft.demo.real_model.run import main

sys.exit(main())
