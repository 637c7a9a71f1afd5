#!/usr/bin/env python3
"""How the fast-scan key transform (src/pq/transform.rs) changes what a 4-bit PQ selection
misses, on a real attention dump: the diagonal map (per-channel query RMS) against the full
map (whitening by the queries' second moment, PCA rotation, eigenvalue allocation).

    python3 scripts/transform_study.py DUMP_DIR [--m 64] [--decode 512] [--ratio 0.1]

DUMP_DIR is a `pqcache-llm dump` folder (q.npy, k.npy as [layer, head, token, dim], f16).
Per layer (kv head 0 and its query heads): trains FAISS's ProductQuantizer (m x 4 bits) on
the mapped keys of all but the last DECODE positions, then at every 16th of those positions
scores every earlier key by ADC (float tables), aggregates the group's softmax (sum) and
reports the recall of the exact top RATIO and the oracle's attention mass the selection
misses. Needs numpy and faiss (../shared/peers/setup.sh installs them).
"""
import argparse
import json
import os

import faiss
import numpy as np


def balance(var, m):
    """Eigenvalue allocation: by decreasing variance to the sub-space with the smallest
    sum of log-variances that still has room (as transform.rs `balance`)."""
    d = len(var)
    per = d // m
    logs, cnt, groups = np.zeros(m), np.zeros(m, int), [[] for _ in range(m)]
    for c in np.argsort(-var, kind="stable"):
        j = min((j for j in range(m) if cnt[j] < per), key=lambda j: logs[j])
        groups[j].append(c)
        cnt[j] += 1
        logs[j] += np.log(max(var[c], 1e-12))
    return np.array([c for g in groups for c in sorted(g)])


def normalised(roots):
    roots = np.maximum(roots, 1e-3 * roots.max())
    return roots / np.exp(np.log(roots).mean())


def fit(kind, keys, queries, m):
    """Key map A (rows: output channels); queries map by A^-T."""
    d = keys.shape[1]
    if kind == "plain":
        a = np.eye(d)
    elif kind == "diagonal":
        a = np.diag(normalised(np.sqrt((queries.astype(np.float64) ** 2).mean(0))))
    else:
        moment = queries.T.astype(np.float64) @ queries / len(queries)
        w, u = np.linalg.eigh(moment)
        s = normalised(np.sqrt(np.maximum(w, 0)))
        a = (u * s) @ u.T
        cov = np.cov((keys @ a.T).T)
        _, v = np.linalg.eigh(cov)
        a = v.T @ a
    a = a[balance((keys @ a.T).var(0), m)]
    return a.astype(np.float32), np.linalg.inv(a).T.astype(np.float32)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("--m", type=int, default=64)
    ap.add_argument("--decode", type=int, default=512)
    ap.add_argument("--ratio", type=float, default=0.1)
    ap.add_argument("--kinds", default="plain,diagonal,full")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    keys_all = np.load(os.path.join(args.dump, "k.npy")).astype(np.float32)
    q_all = np.load(os.path.join(args.dump, "q.npy")).astype(np.float32)
    scale = json.load(open(os.path.join(args.dump, "meta.json")))["attn_scale"]
    n, d = keys_all.shape[2], keys_all.shape[3]
    group = q_all.shape[1] // keys_all.shape[1]
    train = n - args.decode
    print("layer kind      recall  missed-mass")
    for layer in range(keys_all.shape[0]):
        k, q = keys_all[layer, 0], q_all[layer, :group]
        for kind in args.kinds.split(","):
            a, b = fit(kind, k[:train], q[:, :train].reshape(-1, d), args.m)
            mapped = np.ascontiguousarray(k @ a.T)
            pq = faiss.ProductQuantizer(d, args.m, 4)
            pq.train(np.ascontiguousarray(mapped[:train]))
            recon = pq.decode(pq.compute_codes(mapped))
            rec, miss = [], []
            for t in range(train, n, 16):
                qt = q[:, t]
                exact = (qt @ k[: t + 1].T) * scale
                approx = ((qt @ b.T) @ recon[: t + 1].T) * scale

                def agg(logits):
                    e = np.exp(logits - logits.max(1, keepdims=True))
                    return (e / e.sum(1, keepdims=True)).sum(0)

                pe, pa = agg(exact), agg(approx)
                kk = int(args.ratio * (t + 1))
                te, ta = np.argpartition(-pe, kk)[:kk], np.argpartition(-pa, kk)[:kk]
                rec.append(len(np.intersect1d(te, ta)) / kk)
                miss.append(1 - pe[ta].sum() / pe[te].sum())
            print(f"{layer:5} {kind:9} {np.mean(rec):.4f}  {np.mean(miss):.5f}", flush=True)


if __name__ == "__main__":
    main()
