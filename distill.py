"""Make HuatuoGPT's SFT sources with an LLM behind any OpenAI-compatible endpoint.

    python distill.py instructions --n 1000 --out di.jsonl --base-url URL --model-name NAME
    python distill.py conversations --cases cases.jsonl --out dc.jsonl --base-url URL --model-name NAME
    python distill.py polish --in real.jsonl --out polished.jsonl --base-url URL --model-name NAME

`python distill.py COMMAND --help` lists the flags; nanohuatuo/distill.py holds the pipeline.
"""

import sys

from nanohuatuo.distill import main

if __name__ == "__main__":
    sys.exit(main())
