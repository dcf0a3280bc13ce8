"""Chatting with a model: loading for inference, the prompt fitted to the context, streamed replies.

    python chat.py --model DIR [--adapter DIR]               # interactive, streamed
    python chat.py --model DIR --prompt "头痛三天了怎么办？"   # one answer, then exit
    python -m nanohuatuo.chat ...                             # the same

The prompt budget: the context (`--max-len`, capped at the model's max_seq_len) holds the prompt
and the answer, so the prompt gets `context - max_new_tokens` tokens. Whole earlier turns are
dropped, oldest first, until it fits; the system message and the last question are always kept,
and when even those do not fit the question is refused with a message saying by how much
(`PromptTooLong`), never cut (templates.fit_prompt, shared with sampling and evaluation).
HuatuoGPT's own CLI decodes with temperature 0.5, at most 512 new tokens and a 1024-token
context; those are the defaults here unless the model's (or the adapter's)
generation_config.json sets sampling values (flags override both).

A session runs in one engine that keeps each answer's keys (`chat_engine`): a turn's prompt is the
conversation so far plus the new question, so only the part the engine does not hold yet is
prefilled, and the wait before an answer starts no longer grows with the conversation.

Ctrl-C during an answer stops that answer and keeps the conversation; at the input prompt it
exits. A bad model directory ends with one line and exit code 2.
"""

import contextlib
import sys
from dataclasses import dataclass

from .cli import GenerationFlags, ModelFlags, UserError, arg, cli_main, like, resolve_device, resolve_dtype
from .engine import Engine
from .generate import cut_at_stop, inference_quant, load_for_inference, stream
from .hf import check_model_dir
from .quant import INFERENCE_QUANT_HELP, INFERENCE_QUANTS
from .templates import PromptTooLong, fit_prompt, generation_defaults, prompt_budget, stop_strings, stop_token_ids
from .tokenizer import StreamDecoder

# HuatuoGPT's CLI values, used where neither a flag nor generation_config.json says otherwise
DEFAULTS = {"temperature": 0.5, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0}


# ----------------------------------------------------------------------------- answering

def reply(model, tok, template, messages, max_new_tokens=512, temperature=0.5, top_p=1.0, top_k=0,
          repetition_penalty=1.0, seed=None, context=1024, on_text=None, compile=False, stop_ids=(), engine=None):
    """Generate the assistant's answer to `messages` (last one a user turn), streaming text to on_text.

    Earlier turns are dropped to fit the context (templates.fit_prompt); raises PromptTooLong (a
    ValueError) when the system message and the last question alone do not fit. engine: the
    session's (`chat_engine`), whose kept keys spare a turn the prefill of the conversation so far;
    None: a new engine for this answer.
    """
    ids = fit_prompt(messages, tok, template, prompt_budget(model.config.max_seq_len, context, max_new_tokens))
    stops = stop_strings(template)
    hold = max((len(s) for s in stops), default=1) - 1  # text that might be the start of a stop string
    decoder = StreamDecoder(tok)
    text, shown = "", 0
    for t in stream(model, ids, max_new_tokens, temperature, stop_ids=stop_token_ids(tok, template) | set(stop_ids),
                    top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed,
                    pad_id=tok.pad_id, compile=compile, engine=engine):
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


def chat_engine(model, context=1024, compile=False):
    """One engine for a chat session: one slot of the whole context (prompt and answer), keeping each
    answer's keys (Engine's keep_prefixes), so the next turn, whose prompt is this one's conversation
    plus the new question, prefills only what the row does not hold yet. When fit_prompt drops an
    early turn the prompt starts differently, and the next turn is prefilled whole."""
    return Engine(model, slots=1, max_len=min(context, model.config.max_seq_len), compile=compile, keep_prefixes=True)


HELP = "commands: /reset clears the history, /system TEXT sets the system message, /exit quits; " \
       "Ctrl-C stops an answer"


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def utf8(text: str) -> bool:
    """False for text Python decoded with surrogate escapes: a terminal (or argument) in another encoding
    (GBK, say), whose bytes no tokenizer can read."""
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


NOT_UTF8 = "is not UTF-8 text (is the terminal set to another encoding, such as GBK? set it to UTF-8)"


def repl(model, tok, template, system=None, seed=None, **gen):
    """Interactive multi-turn chat on stdin/stdout; answer k is sampled with seed + k (a new answer each time)."""
    messages = [{"role": "system", "content": system}] if system else []
    asked = 0
    print(f"template {template}; {HELP}", flush=True)
    while True:
        try:
            line = input("\n用户> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if not line:
            continue
        if not utf8(line):
            print(f"(not asked: the line {NOT_UTF8})")
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
        shown = []
        _write("助手> ")
        try:
            answer = reply(model, tok, template, messages, on_text=lambda s: (shown.append(s), _write(s)),
                           seed=None if seed is None else seed + asked, **gen)
            asked += 1
        except PromptTooLong as e:
            messages.pop()  # the question never reached the model; the conversation stays as it was
            print(f"\n(not asked: {e})")
            continue
        except KeyboardInterrupt:
            # stop this answer, keep the conversation: what was shown becomes the assistant's turn
            answer = "".join(shown).rstrip()
            print("\n(answer stopped)")
            if not answer:
                messages.pop()
                continue
        else:
            _write("\n")
        messages.append({"role": "assistant", "content": answer})


# ----------------------------------------------------------------------------- command line

@dataclass
class ChatConfig(GenerationFlags, ModelFlags):
    adapter: str | None = arg(None, "LoRA adapter directory (PEFT layout), merged at load")
    prompt: str | None = arg(None, "answer this one question and exit (default: chat interactively)")
    system: str | None = arg(None, "system message (default: the template's)")
    max_new_tokens: int = like(GenerationFlags, "max_new_tokens", 512)
    temperature: float | None = like(GenerationFlags, "temperature",
                                     help="sampling temperature, 0 is greedy (default: generation_config.json's, else 0.5)")
    repetition_penalty: float | None = arg(None, "penalty on tokens already in the prompt or answer "
                                                 "(default: generation_config.json's, else 1.0: off)",
                                                 bounds="(0, inf)")
    max_len: int = arg(1024, "tokens of history plus answer, capped at the model's max_seq_len", old=("--context",),
                       bounds="[1, inf)")
    seed: int = arg(0, "random seed of sampling; answer k of a session uses seed + k, so a run is reproducible")
    quant: str = arg("none", INFERENCE_QUANT_HELP, choices=list(INFERENCE_QUANTS))
    int8: bool = arg(False, "int8 weight-only quantisation", retired="--quant int8")  # earlier spelling, hidden
    compile: bool = arg(False, "torch.compile the decode step (CUDA graphs on CUDA; fused element-wise ops on CPU)")


def generation_settings(cfg: ChatConfig) -> dict:
    """reply()'s sampling arguments: the flags, else generation_config.json, else HuatuoGPT's values."""
    own = generation_defaults(cfg.model, cfg.adapter)
    out = {k: getattr(cfg, k) if getattr(cfg, k) is not None else own.get(k, v) for k, v in DEFAULTS.items()}
    out["stop_ids"] = tuple(own.get("stop_ids", ()))
    return out


def run(cfg: ChatConfig) -> int:
    if not cfg.model:
        raise UserError("--model is required: a model directory (config.json, safetensors weights, tokenizer)")
    if cfg.prompt is not None and not cfg.prompt.strip():
        raise UserError("--prompt is empty: give the question, or leave --prompt out to chat interactively")
    for name, text in (("--prompt", cfg.prompt), ("--system", cfg.system)):
        if text is not None and not utf8(text):
            raise UserError(f"{name} {NOT_UTF8}")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    # an impossible budget is refused before anything is loaded
    prompt_budget(check_model_dir(cfg.model).max_seq_len, cfg.max_len, cfg.max_new_tokens)
    # one-shot: stdout carries the answer alone, so what loading prints goes to stderr
    with contextlib.redirect_stdout(sys.stderr) if cfg.prompt is not None else contextlib.nullcontext():
        model, tok, template = load_for_inference(cfg.model, cfg.adapter, dtype, device,
                                                  inference_quant(cfg.quant, cfg.int8), cfg.template, what="chat")
    gen = dict(max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, context=cfg.max_len,
               engine=chat_engine(model, cfg.max_len, cfg.compile), **generation_settings(cfg))
    if cfg.prompt is not None:
        messages = ([{"role": "system", "content": cfg.system}] if cfg.system else [])
        messages.append({"role": "user", "content": cfg.prompt})
        print(reply(model, tok, template, messages, **gen))
        return 0
    repl(model, tok, template, system=cfg.system, **gen)
    return 0


def main(argv=None) -> int:
    return cli_main(run, ChatConfig, argv, prog="chat.py", description=__doc__)


if __name__ == "__main__":
    sys.exit(main())
