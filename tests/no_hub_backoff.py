"""python tests/no_hub_backoff.py SCRIPT ARGS...: runs SCRIPT as __main__ with huggingface_hub's waits between
retries removed (the retries themselves stay), what test_hub.py's no_backoff fixture does in process. A failed
commit is retried 5 times over ~23 s otherwise; a test of the trainer's failed upload needs the failure, not the
wait."""
import os
import runpy
import sys
from types import SimpleNamespace

import huggingface_hub.utils._http as http

http.time = SimpleNamespace(sleep=lambda seconds: None)
sys.argv = sys.argv[1:]
sys.path[0] = os.path.dirname(os.path.abspath(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name="__main__")
