"""Train a reward model on the AI judge's rankings (RLAIF step 3); see nanohuatuo/reward.py.

    python train_rm.py --model BASE_DIR [--adapter SFT_ADAPTER] --data prefs.jsonl --out out/rm \
        [--lora-r 8 --epochs 1 --lr 1e-4 --batch-prompts 4 --max-len 1024 --eval-frac 0.1 --resume]
    python train_rm.py --help                         # every flag with its default
"""

import sys

from nanohuatuo.reward import main

if __name__ == "__main__":
    sys.exit(main())
