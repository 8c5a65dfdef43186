"""`ray job submit --working-dir . -- python jobs/evaluate.py --model RUN_OR_CHECKPOINT --data FILES [--seq-len N]`

Perplexity of a checkpoint; a training run folder or step_* checkpoint is accepted as --model.
"""

import sys

from rugpt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
