"""Stage 0, data: public corpora to the conversation schema, source mixing, RLAIF prompt files.

    python data.py convert --format cmd_csv --data 内科.csv --out runs/real_doctor.jsonl
    python data.py mix     --data data/sft_*.jsonl --weights real_doctor_instructions=2,other=1 --out runs/sft_mix.jsonl
    python data.py prompts --data runs/real_doctor.jsonl --out runs/prompts.jsonl
    python data.py stats   --data runs/sft_mix.jsonl

`python data.py COMMAND --help` lists a command's flags; nanohuatuo/data.py describes the formats.
"""

import sys

from nanohuatuo.prepare import main

if __name__ == "__main__":
    sys.exit(main())
