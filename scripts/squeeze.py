"""Runs `pqcache-llm ask` and, once the model is loaded, moves it into a memory cgroup (v1)
of LIMIT MB: every page it touches from then on (the context's mapped pages, its new
allocations) is charged there, so the context decodes with at most LIMIT MB resident.

    python3 scripts/squeeze.py BIN GGUF CONTEXT QUESTION LIMIT_MB   (scripts/context-bench.sh)
"""
import json, os, subprocess, sys, tempfile, time
binary, model, ctx, question, limit_mb = sys.argv[1:6]
cg = "/sys/fs/cgroup/memory/pqcache-squeeze"
os.makedirs(cg, exist_ok=True)
open(f"{cg}/memory.limit_in_bytes", "w").write(str(int(limit_mb) * 2**20))
open(f"{cg}/memory.max_usage_in_bytes", "w").write("0")
open(f"{cg}/memory.failcnt", "w").write("0")
err = tempfile.TemporaryFile("w+")
p = subprocess.Popen([binary, "ask", "--model", model, "--context", ctx, "--prompt", question,
                      "--max-new", "16", "--json"], stdout=subprocess.PIPE, stderr=err)
while True:
    err.seek(0)
    if "loaded" in err.read():
        break
    time.sleep(0.005)
open(f"{cg}/cgroup.procs", "w").write(str(p.pid))
out, _ = p.communicate()
peak = int(open(f"{cg}/memory.max_usage_in_bytes").read()) / 2**20
fail = int(open(f"{cg}/memory.failcnt").read())
d = json.loads(out) if p.returncode == 0 else {}
print(json.dumps({"limit_mb": int(limit_mb), "rc": p.returncode, "peak_mb_after_load": round(peak, 1),
                  "limit_hits": fail, "new_text": d.get("new_text"),
                  "time_to_first_token_ms": d.get("time_to_first_token_ms"),
                  "io_per_question_step": d.get("io_per_question_step"),
                  "io_per_answer_step": d.get("io_per_answer_step")}))
