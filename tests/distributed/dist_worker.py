"""What the distributed tests launch with torchrun: `mae` itself, plus markers the tests can read.

`python -m torch.distributed.run ... dist_worker.py pretrain key=value ...` runs `mae pretrain` on
every rank exactly as `torchrun -m openmae pretrain` does. Before, each rank writes its pid to
`<output_dir>/pid-rank<R>` (so a test can kill one); after, it prints `DONE rank=R code=C`, so a
test can tell a finished run from one that crashed, whatever the launcher's exit code says.
"""

import os
import sys
from pathlib import Path

from openmae.cli import main

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    out_dirs = [arg.split("=", 1)[1] for arg in sys.argv[1:] if arg.startswith("output_dir=")]
    if out_dirs:
        Path(out_dirs[-1]).mkdir(parents=True, exist_ok=True)
        (Path(out_dirs[-1]) / f"pid-rank{rank}").write_text(str(os.getpid()))
    code = main(sys.argv[1:])
    print(f"DONE rank={rank} code={code}", flush=True)
    sys.exit(code)
