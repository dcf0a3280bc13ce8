"""The whole HuatuoGPT recipe on the bundled data: tokenizer, tiny model, SFT, sampling, AI feedback,
reward model, PPO, evaluation and report (see nanohuatuo/demo.py).

    python demo.py                      # about five minutes on two CPU cores -> runs/demo/report.md
    python demo.py --quick              # a reduced run in under a minute
    python demo.py --judge-base-url URL --judge-model NAME   # a real LLM judge instead of the offline one
"""

from nanohuatuo.demo import main

if __name__ == "__main__":
    main()
