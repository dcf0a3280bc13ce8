"""Supervised fine-tuning of a chat model on schema JSONL conversations (see nanohuatuo/sft.py).

    python train_sft.py --model DIR --data a.jsonl [b.jsonl ...] --out out/sft [--lora-r 8] [--max-steps N]
    torchrun --nproc_per_node 2 train_sft.py ...      # several processes (DDP); add --fsdp to shard
    python train_sft.py --help                        # every flag with its default
"""

from nanohuatuo.dist import exit_process
from nanohuatuo.sft import main

if __name__ == "__main__":
    exit_process(main())
