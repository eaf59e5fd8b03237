"""Serving what was learned: `adaptloop serve` (OpenAI-compatible) and `adaptloop serving sync` (vLLM, SGLang).

`app.py` builds the server from a `ServeConfig` (`config.py`): requests are
routed to a version (`routing.py`), its adapter held in an LRU
(`adapters.py`), answered by the continuous-batching engine (`engine.py`)
with per-row LoRA on one base model (`lora.py`); `chat.py` is the chat
completions endpoint, `feedback.py` turns ratings and corrections into
events, `follower.py` follows the lifecycle topic, `sync.py` keeps other
inference servers in step. docs/SERVING.md tells the whole story.
"""
