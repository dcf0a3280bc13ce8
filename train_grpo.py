"""GRPO / RLOO with LoRA from K answers per prompt (RLAIF step 4, critic-free); see nanohuatuo/grpo.py.

    python train_grpo.py --model BASE_DIR [--adapter SFT_ADAPTER] --reward RM_DIR --data prompts.jsonl \
        --out out/grpo [--k 4 --batch-size 8 --max-new-tokens 256 --beta 0.04 --advantage grpo|rloo \
        --no-scale-rewards --lr 5e-5 --device cuda --dtype bfloat16 --resume]
    python train_grpo.py ... --reward-fn my_rewards:short_answers      # a rule reward instead
    python train_grpo.py ... --base-url http://127.0.0.1:8000/v1 --model-name NAME   # a judge ranks the K answers
    torchrun --nproc-per-node 2 train_grpo.py ...      # data-parallel
    python train_grpo.py --help                        # every flag with its default

Then chat with the result: python chat.py --model BASE_DIR --adapter out/grpo
"""

from nanohuatuo.dist import exit_process
from nanohuatuo.grpo import main

if __name__ == "__main__":
    exit_process(main())
