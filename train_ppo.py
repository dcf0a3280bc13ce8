"""PPO with LoRA against a reward model (RLAIF step 4); see nanohuatuo/ppo.py.

    python train_ppo.py --model BASE_DIR [--adapter SFT_ADAPTER] --reward RM_DIR --prompts prompts.jsonl \
        --out out/ppo [--max-steps N --batch-size 32 --max-new-tokens 256 --kl-coef 0.05 --lr 5e-5 \
        --critic shared|separate --adaptive-kl --device cuda --dtype bfloat16 --resume]
    torchrun --nproc-per-node 2 train_ppo.py ...      # data-parallel
    python train_ppo.py --help                        # every flag with its default

Then chat with the result: python chat.py --model BASE_DIR --adapter out/ppo
"""

from nanohuatuo.dist import exit_process
from nanohuatuo.ppo import main

if __name__ == "__main__":
    exit_process(main())
