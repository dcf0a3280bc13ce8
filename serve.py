"""Serve a model as an OpenAI-compatible endpoint, with a chat page at /.

    python serve.py --model DIR [--adapter DIR] [--host 127.0.0.1] [--port 8000]

Then any OpenAI client works against it:

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="EMPTY")
    client.chat.completions.create(model="NAME", messages=[{"role": "user", "content": "头痛怎么办？"}])

NAME is the model directory's name (or --model-name); GET /v1/models lists it. Open
http://127.0.0.1:8000/ in a browser to chat. Models are not medical advice: everything they say
must be checked by a doctor.
"""

import sys

from nanohuatuo.serve import main

if __name__ == "__main__":
    sys.exit(main())
