"""nanohuatuo: HuatuoGPT-style medical LLM alignment (SFT, RL from AI feedback, reward model, PPO) in PyTorch.

Run-time dependencies and why each is here:
- torch >= 2.6: the model, training and generation (FSDP's `fully_shard` needs 2.6).
- safetensors: reading and writing Hugging Face weight files.
- sentencepiece, tokenizers: reading tokenizer.model and tokenizer.json (the two formats base models ship).
- jinja2 >= 3.1.6: rendering a model's own chat template exactly as transformers does (the same floor).
- openai >= 1.17: the one client for every OpenAI-compatible endpoint (judge, teacher, patient, endpoint
  candidates); its DefaultHttpxClient and retry counting are used.
- numpy: the evaluation's bootstrap intervals and length-controlled logistic fit.
- matplotlib: the PNG curves every long job writes and the win/tie/loss charts.
serve.py needs nothing more: the standard library's ThreadingHTTPServer is enough for JSON in, JSON or an
event stream out, with one engine thread behind it, so no web framework is pulled in (the "serve" extra is
kept, empty, so `pip install -e ".[serve]"` works as the README says).
Optional extras, each for one input format SFT reads: "parquet" (pyarrow) for Parquet files, "datasets" (the
`datasets` library) for folders written by its save_to_disk. Without them every other format works and
those two say which extra to install. YAML config files need PyYAML, which is not required: `--config` reads
TOML (the standard library's tomllib) and JSON without it.
Console scripts: nanohuatuo-sft, -rm, -ppo, -dpo, -grpo, -serve, -eval, -distill, -demo, -chat, -data, -sample and
-feedback run the same commands as the top-level scripts, so a non-editable install (which has no train_sft.py beside it) works.
Optional experiment trackers, one extra each, imported only when a training run names it in --report-to
(metrics.MetricsLog forwards every metrics row; metrics.jsonl and the PNGs are written either way):
- tensorboard: torch.utils.tensorboard's SummaryWriter needs the tensorboard package to write event files.
- trackio: a local, wandb-compatible tracker (its own dashboard, no account needed).
- wandb: Weights & Biases, the hosted tracker many teams already use.
Test-only: transformers, peft (and protobuf, which transformers needs to read a bare tokenizer.model) are the
reference implementations the tests compare against; nltk and rouge-score are the reference metrics; and
websocket-client drives headless Chromium through the DevTools protocol in the chat-page test. None of them is
imported at run time.
"""

from setuptools import find_packages, setup

setup(
    name="nanohuatuo",
    version="0.2.0",
    description=__doc__.splitlines()[0],
    packages=find_packages(include=["nanohuatuo", "nanohuatuo.*"]),
    package_data={"nanohuatuo": ["static/*"]},
    python_requires=">=3.11",
    install_requires=["torch>=2.6", "safetensors", "sentencepiece", "tokenizers", "jinja2>=3.1.6", "openai>=1.17",
                      "numpy", "matplotlib"],
    entry_points={"console_scripts": [
        "nanohuatuo-sft = nanohuatuo.sft:main", "nanohuatuo-rm = nanohuatuo.reward:main",
        "nanohuatuo-ppo = nanohuatuo.ppo:main", "nanohuatuo-dpo = nanohuatuo.dpo:main",
        "nanohuatuo-grpo = nanohuatuo.grpo:main",
        "nanohuatuo-serve = nanohuatuo.serve:main",
        "nanohuatuo-eval = nanohuatuo.evaluate:main", "nanohuatuo-distill = nanohuatuo.distill:main",
        "nanohuatuo-demo = nanohuatuo.demo:main", "nanohuatuo-chat = nanohuatuo.chat:main",
        "nanohuatuo-data = nanohuatuo.prepare:main", "nanohuatuo-sample = nanohuatuo.sampling:main",
        "nanohuatuo-feedback = nanohuatuo.feedback:main"]},
    extras_require={"serve": [], "parquet": ["pyarrow"], "datasets": ["datasets"],
                    "tensorboard": ["tensorboard"], "trackio": ["trackio"], "wandb": ["wandb"],
                    "test": ["pytest", "transformers", "peft", "protobuf", "nltk", "rouge-score", "websocket-client"]},
)
