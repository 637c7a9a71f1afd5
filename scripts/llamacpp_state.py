"""The llama.cpp peer for saved contexts (issue 17): prefill a document, save llama.cpp's
state to a file (llama_state_save_file), then in a fresh process load it back
(llama_state_load_file), decode the question and answer greedily. Prints one JSON object per
phase. Needs llama-cpp-python (PyPI; it builds llama.cpp from source).

    python scripts/llamacpp_state.py save GGUF IDS.json STATE
    python scripts/llamacpp_state.py ask GGUF STATE QUESTION_IDS.json [MAX_NEW]

IDS.json / QUESTION_IDS.json: token ids (`pqcache-llm tokenize`, the same tokenizer), so that
both runtimes see the same tokens.
"""
import ctypes
import json
import os
import sys
import time

import llama_cpp


def context(gguf, n_ctx):
    llama_cpp.llama_backend_init()
    mp = llama_cpp.llama_model_default_params()
    model = llama_cpp.llama_model_load_from_file(gguf.encode(), mp)
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx = n_ctx
    cp.n_batch = 512
    cp.n_ubatch = 512
    cp.n_threads = cp.n_threads_batch = os.cpu_count()
    ctx = llama_cpp.llama_init_from_model(model, cp)
    return model, ctx


def decode(ctx, ids, start, logits_last=True):
    """Runs `ids` from position `start` in batches of 512; logits of the last one."""
    batch = llama_cpp.llama_batch_init(512, 0, 1)
    for i in range(0, len(ids), 512):
        part = ids[i : i + 512]
        batch.n_tokens = len(part)
        for j, t in enumerate(part):
            batch.token[j] = t
            batch.pos[j] = start + i + j
            batch.n_seq_id[j] = 1
            batch.seq_id[j][0] = 0
            batch.logits[j] = logits_last and (i + j == len(ids) - 1)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
    llama_cpp.llama_batch_free(batch)


def argmax(ctx, model):
    vocab = llama_cpp.llama_model_get_vocab(model)
    n = llama_cpp.llama_vocab_n_tokens(vocab)
    row = llama_cpp.llama_get_logits_ith(ctx, -1)
    return max(range(n), key=lambda i: row[i])


def rusage():
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    io = open("/proc/self/io").read().split("\n")
    read = int(next(l for l in io if l.startswith("read_bytes")).split()[1])
    return r.ru_majflt, read


def main():
    cmd = sys.argv[1]
    if cmd == "save":
        gguf, ids_path, state = sys.argv[2:5]
        ids = json.load(open(ids_path))
        model, ctx = context(gguf, len(ids) + 128)
        t = time.time()
        decode(ctx, ids, 0)
        prefill_s = time.time() - t
        toks = (llama_cpp.llama_token * len(ids))(*ids)
        t = time.time()
        ok = llama_cpp.llama_state_save_file(ctx, state.encode(), toks, len(ids))
        print(json.dumps({"phase": "save", "ok": bool(ok), "tokens": len(ids),
                          "prefill_s": prefill_s, "save_s": time.time() - t,
                          "state_bytes": os.path.getsize(state)}))
    elif cmd == "ask":
        gguf, state, q_path = sys.argv[2:5]
        max_new = int(sys.argv[5]) if len(sys.argv) > 5 else 16
        question = json.load(open(q_path))
        t = time.time()
        model, ctx = context(gguf, 32768)
        load_model_s = time.time() - t
        cap = 40000
        toks = (llama_cpp.llama_token * cap)()
        n = ctypes.c_size_t(0)
        f0, r0 = rusage()
        t0 = time.time()
        ok = llama_cpp.llama_state_load_file(ctx, state.encode(), toks, cap, ctypes.byref(n))
        open_ms = (time.time() - t0) * 1e3
        f1, r1 = rusage()
        pos = n.value
        decode(ctx, question, pos)
        pos += len(question)
        new = [argmax(ctx, model)]
        ttft_ms = (time.time() - t0) * 1e3
        while len(new) < max_new:
            decode(ctx, [new[-1]], pos)
            pos += 1
            new.append(argmax(ctx, model))
        print(json.dumps({"phase": "ask", "ok": bool(ok), "context_tokens": n.value,
                          "load_model_s": load_model_s, "open_ms": open_ms,
                          "time_to_first_token_ms": ttft_ms, "open_major_faults": f1 - f0,
                          "open_read_bytes": r1 - r0, "new_ids": new}))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
