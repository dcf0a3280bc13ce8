"""HuatuoGPT's evaluation: reference metrics, pairwise judging, multi-turn consultations, human sheets.

    python evaluate.py metrics  --data test.jsonl --model runs/sft
    python evaluate.py pairwise --data data/eval_questions.json --a-model runs/ppo --b-model runs/sft --judge offline
    python evaluate.py dialogue --data data/eval_dialogues.json --a-model runs/ppo --b-model runs/sft \
        --judge offline --patient offline
    python evaluate.py sheet    --source runs/eval_pairwise --out runs/sheet
    python evaluate.py tally    --sheet runs/sheet --marks marks.csv

`python evaluate.py COMMAND --help` lists a command's flags; nanohuatuo/evaluate.py says how each mode works.
"""

import sys

from nanohuatuo.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
