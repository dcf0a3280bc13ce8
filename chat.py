"""Chat with a model in a Hugging Face directory (optionally with a LoRA adapter).

    python chat.py --model DIR [--adapter DIR]                 # interactive, streamed
    python chat.py --model DIR --prompt "头痛三天了怎么办？"     # one answer, then exit

Models are not medical advice: everything they say must be checked by a doctor.
"""

import argparse

import torch

from nanohuatuo.chat import load_for_chat, reply, repl


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="Hugging Face model directory (config.json + safetensors)")
    ap.add_argument("--adapter", help="LoRA adapter directory (PEFT layout), merged at load")
    ap.add_argument("--prompt", help="answer this one question and exit")
    ap.add_argument("--system", help="system message (default: the template's)")
    ap.add_argument("--template", help="chat template name (default: guessed from the model directory)")
    ap.add_argument("--max-new-tokens", type=int, default=512)
    ap.add_argument("--temperature", type=float, default=0.5)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--repetition-penalty", type=float, default=1.0)
    ap.add_argument("--context", type=int, default=1024, help="tokens of history plus answer kept")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                    help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--int8", action="store_true", help="int8 weight-only quantisation (7B fits a 24 GB card)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the decode step (CUDA)")
    args = ap.parse_args(argv)

    dtype = getattr(torch, args.dtype) if args.dtype else None
    model, tok, template = load_for_chat(args.model, args.adapter, dtype, args.device, args.int8, args.template)
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
               top_k=args.top_k, repetition_penalty=args.repetition_penalty, seed=args.seed,
               context=args.context, compile=args.compile)
    if args.prompt is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": args.prompt})
        print(reply(model, tok, template, messages, **gen))
        return
    repl(model, tok, template, system=args.system, **gen)


if __name__ == "__main__":
    main()
