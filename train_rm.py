"""Train a reward model on the AI judge's rankings (RLAIF step 3); see nanohuatuo/reward.py.

    python train_rm.py --base BASE_DIR [--adapter SFT_ADAPTER] --data prefs.jsonl --out runs/rm \
        [--lora-r 8 --epochs 1 --lr 1e-4 --batch-prompts 4 --max-len 1024 --eval-frac 0.1 \
         --eval-data FILE --max-steps N --center-coef 0.01 --normalize-std --device cuda --dtype bfloat16]
"""

import sys

from nanohuatuo import reward

if __name__ == "__main__":
    reward.main(sys.argv[1:])
