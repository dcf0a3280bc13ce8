"""Train a policy on the AI judge's rankings with DPO (or IPO, conservative DPO); see nanohuatuo/dpo.py.

    python train_dpo.py --model BASE_DIR [--adapter SFT_ADAPTER] --data prefs.jsonl --out out/dpo \
        [--pairs all|best-worst --loss sigmoid|ipo|hinge --beta 0.1 --label-smoothing 0 --lora-r 8 --lr 5e-5 \
         --batch-size 16 --micro-batch-size 2 --max-len 1024 --resume]
    torchrun --nproc_per_node 2 train_dpo.py ...      # each batch's pairs split over the processes
    python train_dpo.py --help                        # every flag with its default
"""

from nanohuatuo.dist import exit_process
from nanohuatuo.dpo import main

if __name__ == "__main__":
    exit_process(main())
