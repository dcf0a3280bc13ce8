"""Serve a model as an OpenAI-compatible endpoint, with a chat page at /.

    python serve.py --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]

`python serve.py --help` lists the flags; nanohuatuo/serve.py holds the server.
Models are not medical advice: everything they say must be checked by a doctor.
"""

import sys

from nanohuatuo.serve import main

if __name__ == "__main__":
    sys.exit(main())
