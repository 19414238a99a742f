import os
import sys

from .cli import main

code = main()
if os.environ.get("WORLD_SIZE", "1").strip() not in ("", "0", "1"):
    # A torchrun worker has left its process group and flushed its output: skip interpreter shutdown, where
    # gloo's transport threads can abort the process ("terminate called without an active exception",
    # seen once in 2-process CI runs after a clean finish) and turn a finished run into a failed one.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
