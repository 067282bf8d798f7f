#!/usr/bin/env python
"""Communication volume of vocabulary-parallel (tensor-parallel) lm_head losses: hykernels'
scheme against Megatron-LM's vocab_parallel_cross_entropy and a naive all-gather of the logits.

Analytic (nothing is run on a device): each of P ranks holds a weight slice [V/P, D] and the same
hidden [N, D] and targets [N]. For every collective it counts the payload S (bytes of the tensor
handed to the collective; for an all-gather, the gathered total) and the ring-algorithm bus bytes
each rank sends (= receives):

    all-reduce      2·(P−1)/P · S
    all-gather      (P−1)/P · S_total
    reduce-scatter  (P−1)/P · S_total

Schemes (per call / per training step = forward + backward):
  hykernels     forward: MAX all-reduce of the row max m [N] fp32; SUM all-reduce of a stacked
                [4, N] fp32 (Σe^{z−m}, Σ(z−m)e^{z−m}, Σ(z−m), target logit z_y) after rebasing to
                the global max; MIN all-reduce of the argmax candidate [N] int64; all-gather of the
                slice sizes (P int64); with value checks on (the default) a MAX all-reduce of an
                12-element fp64 fingerprint of hidden/targets. dH [N, D] SUM all-reduce in the hidden
                dtype: in backward (token_stats) or inside forward (fused_loss, which forms the
                gradients in forward; its backward only scales them and communicates nothing).
  megatron_ce   Megatron-LM vocab_parallel_cross_entropy: all-reduce MAX [N] fp32, SUM predicted
                logit [N] fp32, SUM sum-exp [N] fp32 (CE only); backward local. dH all-reduce in
                ColumnParallelLinear's backward.
  naive_*       all-gather the logits [N, V] (bf16 or fp32) to every rank, loss computed there
                (replicated). Backward assumed = Megatron's gather_from_tensor_model_parallel_region:
                each rank keeps its own vocab slice of dZ, no communication; the variant with a
                reduce-scatter of dZ [N, V] (what a plain autograd all-gather does) is reported too.

The dH all-reduce is the cost of any tensor-parallel lm_head (Megatron's column-parallel linear
does it), not of the loss, so it is reported apart ("tp_lm_head") from the loss's own traffic.

    python bench/comm_volume.py [--out bench/results/comm-volume.json]

Writes the JSON (shapes, per-collective bytes, totals per step, ratios) and prints a markdown
table. Stdlib only; torch/triton/hykernels versions are read from package metadata (no import).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import shlex
import sys
from fractions import Fraction
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _common  # noqa: E402  (stdlib-only at import time)

# name -> (N rows, D hidden, V vocab): the bench shapes
SHAPES = {
    "qwen-like": (16384, 4096, 151936),
    "llama-3-like": (8192, 4096, 128256),
}
RANKS = (2, 4, 8)
HIDDEN_DTYPE, HIDDEN_BYTES = "bfloat16", 2
FP32, FP64, INT64 = 4, 8, 8
FINGERPRINT_ELEMS = 12  # 6 fp64 values and their negatives: one MAX gives max and min


def bus_bytes(kind: str, payload: int, p: int) -> Fraction:
    """Ring-collective bytes each rank sends (= receives) for a payload of ``payload`` bytes."""
    if kind == "all_reduce":
        return Fraction(2 * (p - 1), p) * payload
    if kind in ("all_gather", "reduce_scatter"):
        return Fraction(p - 1, p) * payload
    raise ValueError(kind)


def _num(x: Fraction):
    return int(x) if x.denominator == 1 else float(x)


def coll(name, kind, op, shape, dtype, payload, phase, group, note=""):
    return {"name": name, "kind": kind, "op": op, "shape": shape, "dtype": dtype,
            "payload_bytes": payload, "phase": phase, "group": group, "note": note}


def schemes(n: int, d: int, v: int, p: int) -> dict:
    """Collectives per scheme; ``phase`` is forward/backward, ``group`` is loss / check /
    tp_lm_head (the dH all-reduce any TP lm_head needs)."""
    dh = lambda phase: coll("dH", "all_reduce", "SUM", [n, d], HIDDEN_DTYPE, n * d * HIDDEN_BYTES,  # noqa: E731
                            phase, "tp_lm_head", "grad of hidden; needed by any TP lm_head")
    hk_fwd = [
        coll("row_max", "all_reduce", "MAX", [n], "float32", n * FP32, "forward", "loss", "row max m"),
        coll("stats", "all_reduce", "SUM", [4, n], "float32", 4 * n * FP32, "forward", "loss",
             "Σe^(z−m), Σ(z−m)e^(z−m), Σ(z−m), z_y after rebasing to the global max"),
        coll("argmax", "all_reduce", "MIN", [n], "int64", n * INT64, "forward", "loss",
             "argmax candidate (global index, or a sentinel where the rank's max is not the global one)"),
        coll("slice_sizes", "all_gather", None, [p], "int64", p * INT64, "forward", "loss",
             "each rank's vocab slice size, for the offsets"),
        coll("fingerprint", "all_reduce", "MAX", [FINGERPRINT_ELEMS], "float64", FINGERPRINT_ELEMS * FP64,
             "forward", "check", "hidden/targets agree across ranks (value checks on, the default)"),
    ]
    naive = lambda b, dt: [  # noqa: E731
        coll("logits", "all_gather", None, [n, v], dt, n * v * b, "forward", "loss",
             "every rank gets the full logits"),
        dh("backward"),
    ]
    naive_rs = lambda b, dt: naive(b, dt) + [  # noqa: E731
        coll("dlogits", "reduce_scatter", "SUM", [n, v], dt, n * v * b, "backward", "loss",
             "autograd all-gather backward: reduce-scatter of dZ"),
    ]
    return {
        "hykernels_token_stats": hk_fwd + [dh("backward")],
        "hykernels_fused_loss": hk_fwd + [dh("forward")],
        "megatron_vocab_parallel_ce": [
            coll("logits_max", "all_reduce", "MAX", [n], "float32", n * FP32, "forward", "loss"),
            coll("predicted_logits", "all_reduce", "SUM", [n], "float32", n * FP32, "forward", "loss"),
            coll("sum_exp_logits", "all_reduce", "SUM", [n], "float32", n * FP32, "forward", "loss"),
            dh("backward"),
        ],
        "naive_allgather_logits_bf16": naive(2, "bfloat16"),
        "naive_allgather_logits_fp32": naive(4, "float32"),
        "naive_allgather_logits_bf16_rs_backward": naive_rs(2, "bfloat16"),
        "naive_allgather_logits_fp32_rs_backward": naive_rs(4, "float32"),
    }


def totals(colls: list, p: int) -> dict:
    def s(pred):
        sel = [c for c in colls if pred(c)]
        return {"payload_bytes": sum(c["payload_bytes"] for c in sel),
                "bus_bytes_per_rank": _num(sum((bus_bytes(c["kind"], c["payload_bytes"], p) for c in sel),
                                               Fraction(0))),
                "collectives": len(sel)}

    return {
        "loss": s(lambda c: c["group"] in ("loss", "check")),  # the loss's own traffic (checks on)
        "loss_checks_off": s(lambda c: c["group"] == "loss"),
        "tp_lm_head_dH": s(lambda c: c["group"] == "tp_lm_head"),
        "forward": s(lambda c: c["phase"] == "forward"),
        "backward": s(lambda c: c["phase"] == "backward"),
        "step": s(lambda c: True),  # forward + backward, checks on
        "step_checks_off": s(lambda c: c["group"] != "check"),
    }


def build() -> dict:
    cases = []
    for shape_name, (n, d, v) in SHAPES.items():
        for p in RANKS:
            sch = schemes(n, d, v, p)
            out = {}
            for name, colls in sch.items():
                for c in colls:
                    c["bus_bytes_per_rank"] = _num(bus_bytes(c["kind"], c["payload_bytes"], p))
                out[name] = {"collectives": colls, "totals": totals(colls, p)}
            hk = out["hykernels_fused_loss"]["totals"]
            bus = lambda s, k: out[s]["totals"][k]["bus_bytes_per_rank"]  # noqa: E731
            ratios = {
                # naive all-gather logits bytes / hykernels bytes (bus bytes per rank; the payload
                # ratios differ only in the tiny P-dependent terms)
                "naive_bf16_over_hk_loss": bus("naive_allgather_logits_bf16", "loss") / hk["loss"]["bus_bytes_per_rank"],
                "naive_fp32_over_hk_loss": bus("naive_allgather_logits_fp32", "loss") / hk["loss"]["bus_bytes_per_rank"],
                "naive_bf16_over_hk_step": bus("naive_allgather_logits_bf16", "step") / hk["step"]["bus_bytes_per_rank"],
                "naive_fp32_over_hk_step": bus("naive_allgather_logits_fp32", "step") / hk["step"]["bus_bytes_per_rank"],
                "naive_bf16_rs_over_hk_step": bus("naive_allgather_logits_bf16_rs_backward", "step") / hk["step"]["bus_bytes_per_rank"],
                "naive_fp32_rs_over_hk_step": bus("naive_allgather_logits_fp32_rs_backward", "step") / hk["step"]["bus_bytes_per_rank"],
                "hk_loss_over_megatron_loss": hk["loss"]["bus_bytes_per_rank"] / bus("megatron_vocab_parallel_ce", "loss"),
                "hk_step_over_megatron_step": hk["step"]["bus_bytes_per_rank"] / bus("megatron_vocab_parallel_ce", "step"),
            }
            cases.append({"shape": shape_name, "N": n, "D": d, "V": v, "P": p, "V_per_rank": -(-v // p),
                          "schemes": out, "ratios": ratios})
    return cases


def _mib(b) -> str:
    m = b / 2**20
    return f"{m:.0f}" if m >= 1000 else f"{m:.1f}"


def table(cases: list) -> str:
    rows = ["| shape | P | hk loss KiB | Megatron CE KiB | dH AR MiB | hk step MiB | naive AG bf16 MiB "
            "| naive AG fp32 MiB | naive/hk loss bf16 | fp32 | naive/hk step bf16 | fp32 |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for c in cases:
        s = c["schemes"]
        t = lambda name, k: s[name]["totals"][k]["bus_bytes_per_rank"]  # noqa: E731
        r = c["ratios"]
        rows.append(
            f"| {c['shape']} N={c['N']} V={c['V']} | {c['P']} "
            f"| {t('hykernels_fused_loss', 'loss') / 1024:.0f} "
            f"| {t('megatron_vocab_parallel_ce', 'loss') / 1024:.0f} "
            f"| {_mib(t('hykernels_fused_loss', 'tp_lm_head_dH'))} "
            f"| {_mib(t('hykernels_fused_loss', 'step'))} "
            f"| {_mib(t('naive_allgather_logits_bf16', 'loss'))} "
            f"| {_mib(t('naive_allgather_logits_fp32', 'loss'))} "
            f"| {r['naive_bf16_over_hk_loss']:.0f}× | {r['naive_fp32_over_hk_loss']:.0f}× "
            f"| {r['naive_bf16_over_hk_step']:.1f}× | {r['naive_fp32_over_hk_step']:.1f}× |")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "comm-volume.json"))
    args = ap.parse_args(argv)
    cases = build()
    report = {
        "benchmark": "vocab-parallel lm_head loss: communication volume per rank (bench/comm_volume.py)",
        "date": _dt.date.today().isoformat(),
        "timestamp_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([sys.executable] + sys.argv),
        "argv": sys.argv,
        "device_name": "none (analytic)",
        "device": {"kind": "analytic", "note": "byte counts from the collectives' shapes; nothing is run"},
        "versions": {"python": sys.version.split()[0],
                     "torch": _common.package_version("torch"),
                     "triton": _common.package_version("triton"),
                     "hykernels": _common.package_version("hykernels"),
                     "hykernels_commit": _common.git_commit()},
        "config": {"shapes": {k: {"N": n, "D": d, "V": v} for k, (n, d, v) in SHAPES.items()},
                   "ranks": list(RANKS), "hidden_dtype": HIDDEN_DTYPE, "value_checks": True},
        "method": {
            "payload_bytes": "bytes of the tensor handed to the collective (all-gather: the gathered total)",
            "bus_bytes_per_rank": "ring algorithm, bytes each rank sends (= receives): all-reduce 2·(P−1)/P·S, "
                                  "all-gather and reduce-scatter (P−1)/P·S_total",
            "groups": "loss = the loss's own collectives; check = the hykernels value-check fingerprint "
                      "(counted in loss/step, excluded in *_checks_off); tp_lm_head = the dH [N, D] all-reduce "
                      "every tensor-parallel lm_head needs (Megatron ColumnParallelLinear too)",
            "step": "one training step = forward + backward. hykernels_fused_loss forms gradients in forward "
                    "(dH all-reduce in forward, backward communicates nothing); hykernels_token_stats does "
                    "the dH all-reduce in backward; the totals are the same",
            "naive_backward": "naive_allgather_logits_*: backward as Megatron's gather_from_tensor_model_parallel"
                              "_region (each rank keeps its slice of dZ, no communication) + the dH all-reduce; "
                              "*_rs_backward adds a reduce-scatter of dZ [N, V] (autograd all-gather backward)",
            "ratios": "bus bytes per rank; *_loss = the loss's own traffic, *_step = loss + dH all-reduce",
        },
        "cases": cases,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"[comm_volume] wrote {out}", file=sys.stderr)
    print(table(cases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
