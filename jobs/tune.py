"""`ray job submit --working-dir . -- python jobs/tune.py --config tune/lr_wd.yaml [--out DIR] [key=value ...]`

The same as `rugpt-ray tune`; the sweep folder is printed on the last line.
"""

import sys

from rugpt_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
