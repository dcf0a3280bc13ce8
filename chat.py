"""Chat with a model in a Hugging Face directory (optionally with a LoRA adapter).

    python chat.py --model DIR [--adapter DIR]                 # interactive, streamed
    python chat.py --model DIR --prompt "头痛三天了怎么办？"     # one answer, then exit

Flags: `python chat.py --help`; the code is nanohuatuo/chat.py. Models are not medical advice:
everything they say must be checked by a doctor.
"""

import sys

from nanohuatuo.chat import main

if __name__ == "__main__":
    sys.exit(main())
