"""Chatting with a model: loading for inference, history trimmed to the context, streamed replies.

Used by the top-level `chat.py` (interactive and one-shot) and by the demo. HuatuoGPT's own
CLI decodes with temperature 0.5, at most 512 new tokens, a 1024-token context and stops on EOS
and on `<病人>`; those are the defaults here.
"""

import sys

import torch

from .generate import cut_at_stop, stream
from .model import Transformer
from .templates import guess_template, render_prompt, stop_strings, stop_token_ids
from .tokenizer import StreamDecoder, Tokenizer


def pick_device(device=None):
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_for_chat(model_dir, adapter=None, dtype=None, device=None, int8=False, template=None):
    """(model, tokenizer, template name) ready for inference.

    bf16 on CUDA by default (a 7B model then needs about 15 GB), float32 on CPU; `int8` stores
    linear weights as int8 (about 7.5 GB for 7B). An adapter is merged first, so chatting costs
    no more than the base model.
    """
    device = pick_device(device)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # int8: load on the CPU, quantise, then move, so the full-precision copy never sits on the GPU
    model = Transformer.from_pretrained(model_dir, dtype=dtype, device="cpu" if int8 else device, adapter=adapter)
    if adapter is not None:
        from .lora import merge_and_unload
        merge_and_unload(model)
    if int8:
        from .quant import quantize_int8
        quantize_int8(model)
        model.to(device)
    model.eval()
    tok = Tokenizer.from_pretrained(model_dir)
    return model, tok, template or guess_template(model_dir)


def trim_history(messages, tok, template, budget):
    """Drop the oldest user/assistant pairs (keeping a system message) until the prompt fits `budget` tokens.

    A single last question longer than the budget is kept whole; the caller cuts its ids from the left.
    """
    messages = list(messages)
    system = [m for m in messages[:1] if m["role"] == "system"]
    turns = messages[len(system):]
    while len(turns) > 1 and len(render_prompt(system + turns, tok, template)) > budget:
        turns = turns[2:]  # one question and its answer
    return system + turns


def reply(model, tok, template, messages, max_new_tokens=512, temperature=0.5, top_p=1.0, top_k=0,
          repetition_penalty=1.0, seed=None, context=1024, on_text=None, compile=False):
    """Generate the assistant's answer to `messages` (last one a user turn), streaming text to on_text."""
    budget = max(context - max_new_tokens, 1)
    messages = trim_history(messages, tok, template, budget)
    ids = render_prompt(messages, tok, template)[-budget:]
    stops = stop_strings(template)
    hold = max((len(s) for s in stops), default=1) - 1  # text that might be the start of a stop string
    decoder = StreamDecoder(tok)
    text, shown = "", 0
    for t in stream(model, ids, max_new_tokens, temperature, stop_ids=stop_token_ids(tok, template),
                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                    pad_id=tok.pad_id, compile=compile):
        text += decoder.put(t)
        cut = cut_at_stop(text, stops)
        if len(cut) < len(text):  # a stop string appeared
            text = cut
            break
        if on_text and len(text) - hold > shown:
            on_text(text[shown:len(text) - hold])
            shown = len(text) - hold
    else:
        text = cut_at_stop(text + decoder.flush(), stops)
    text = text.rstrip()
    if on_text and len(text) > shown:
        on_text(text[shown:])
    return text


HELP = "commands: /reset clears the history, /system TEXT sets the system message, /exit quits"


def repl(model, tok, template, system=None, **gen):
    """Interactive multi-turn chat on stdin/stdout."""
    messages = [{"role": "system", "content": system}] if system else []
    print(f"template {template}; {HELP}", flush=True)
    while True:
        try:
            line = input("\n用户> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            messages = [m for m in messages if m["role"] == "system"]
            print("(history cleared)")
            continue
        if line.startswith("/system"):
            text = line[len("/system"):].strip()
            messages = ([{"role": "system", "content": text}] if text else []) + \
                [m for m in messages if m["role"] != "system"]
            print(f"(system message {'set' if text else 'cleared'})")
            continue
        if line.startswith("/"):
            print(HELP)
            continue
        messages.append({"role": "user", "content": line})
        sys.stdout.write("助手> ")
        answer = reply(model, tok, template, messages, on_text=lambda s: (sys.stdout.write(s), sys.stdout.flush()),
                       **gen)
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})
