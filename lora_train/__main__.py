import os
import sys

from .cpu_threads import configure

# before anything imports torch: OpenMP reads its settings once (cpu_threads.py says why)
os.environ["LORA_TRAIN_CPU_THREADS"] = configure()

from .cli.main import main  # noqa: E402

sys.exit(main())
