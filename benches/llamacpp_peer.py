#!/usr/bin/env python3
"""llama.cpp (through llama-cpp-python) on the same GGUF and prompt ids as pqcache-llm:
prefill tokens/s and greedy decode tokens/s, as one JSON line.
usage: llamacpp_peer.py GGUF IDS.json NEW THREADS"""
import json, sys, time
import numpy as np
from llama_cpp import Llama

gguf, ids_path, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ids = json.load(open(ids_path))
llm = Llama(model_path=gguf, n_ctx=len(ids) + new + 8, n_batch=512, n_ubatch=512,
            n_threads=threads, n_threads_batch=threads, verbose=False)
t = time.perf_counter()
llm.eval(ids)
prefill = time.perf_counter() - t
def last_logits():
    # Only the batch's last row has logits (logits_all is off, as in serving).
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))

out = []
t = time.perf_counter()
for _ in range(new):
    tok = int(np.argmax(last_logits()))
    out.append(tok)
    llm.eval([tok])
decode = time.perf_counter() - t
print(json.dumps({"peer": "llama.cpp", "prompt_tokens": len(ids),
                  "prefill_tokens_per_s": len(ids) / prefill, "decode_tokens_per_s": new / decode,
                  "new_ids": out}))
