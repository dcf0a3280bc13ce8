"""The whole HuatuoGPT recipe on the bundled data: tokenizer, tiny model, SFT, sampling, AI feedback,
reward model, PPO, HuatuoGPT's evaluation and a report (see nanohuatuo/demo.py).

    python demo.py                      # about five minutes on two CPU cores -> runs/demo/report.md
    python demo.py --quick              # a reduced run in under a minute
    python demo.py --llm-base-url URL --llm-model NAME     # an LLM as teacher, judge and patient
    python demo.py --model /models/Qwen2.5-0.5B-Instruct   # the recipe with LoRA on a real checkpoint
"""

import sys

from nanohuatuo.demo import main

if __name__ == "__main__":
    sys.exit(main())
