"""Several ``lmtune`` training runs in one ``torchrun`` job (tests/test_fsdp.py starts it).

Starting torch and transformers twice per run is most of a launch's time on a slow machine, so
one job trains every run listed in the JSON file given as argv[1] (one list of ``key=value``
arguments per run), one after the other. The job joins the process group itself: lmtune leaves a
group it did not create standing, so each run finds it and the job destroys it at the end.
"""

import json
import sys

import torch.distributed as dist

from lmtune.config import load_config
from lmtune.run import run_training

if __name__ == "__main__":
    dist.init_process_group("gloo")
    for args in json.loads(open(sys.argv[1]).read()):
        run_training(load_config(None, args))
    dist.barrier()
    dist.destroy_process_group()
