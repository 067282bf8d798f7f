"""One rank of the vocab-parallel tests (tests/test_distributed.py), run with the gloo backend.

Every rank builds the same full problem from a shared seed, computes the single-process result
with the whole weight, then the vocab-parallel result from its own slice, and records the
largest differences (and the error messages of bad calls) in a JSON file per rank.
"""
import json
import os
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist

import hykernels as hk

N, D, V = 29, 16, 103  # V divisible by neither 2 nor 3


def problem(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, dtype=torch.float64) * 2
    w = torch.randn(V, D, generator=g, dtype=torch.float64) / D**0.5
    b = torch.randn(V, generator=g, dtype=torch.float64)
    w[V - 2], b[V - 2], b[5] = w[5], 9.0, 9.0  # two equal maxima in different shards: argmax 5
    h[3] = 0.0
    y = torch.randint(0, V, (N,), generator=g)
    y[::4] = -100
    up = [torch.randn(N, generator=g, dtype=torch.float64) for _ in range(4)]
    return h.to(dtype), w.to(dtype), b.to(dtype), y, [u.float() for u in up]


def local_slice(x, rank, world):
    """This rank's rows in torch.chunk order (what DTensor's Shard(0) holds too)."""
    return x.chunk(world)[rank]


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def diff(a, b):
    if a.dtype in (torch.int64, torch.int32):
        return 0.0 if torch.equal(a, b) else float("inf")
    scale = max(1.0, a.abs().max().item())
    return (a.double() - b.double()).abs().max().item() / scale


def stats_case(backend, h, w, b, y, up, local_w, local_b, **kw):
    """token_stats + backward through logp, entropy, self_certainty and lse."""
    outs = []
    for weight, bias, extra in ((w, b, {}), (local_w, local_b, kw)):
        hh, ww, bb = leaves(h, weight, bias)
        st = hk.token_stats(hh, ww, y, bias=bb, softcap=6.0, temperature=0.8, backend=backend, **extra)
        (st.logp * up[0] + st.entropy * up[1] + st.self_certainty * up[2] + st.lse * up[3]).sum().backward()
        outs.append((st, hh.grad, ww.grad, bb.grad))
    return outs


@contextmanager
def recording(calls):
    """dist.all_reduce and dist.all_gather append [kind, op, elements] to ``calls`` while inside."""
    orig_ar, orig_ag = dist.all_reduce, dist.all_gather

    def all_reduce(t, op=dist.ReduceOp.SUM, group=None, async_op=False):
        calls.append(["all_reduce", str(op).split(".")[-1], t.numel()])
        return orig_ar(t, op=op, group=group, async_op=async_op)

    def all_gather(outs, t, group=None, async_op=False):
        calls.append(["all_gather", None, t.numel() * len(outs)])
        return orig_ag(outs, t, group=group, async_op=async_op)

    dist.all_reduce, dist.all_gather = all_reduce, all_gather
    try:
        yield
    finally:
        dist.all_reduce, dist.all_gather = orig_ar, orig_ag


def run(rank: int, world: int, init_file: str, backend: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    if backend == "triton":
        from hykernels.backends import triton as tb

        tb._configs.OVERRIDE = tb.Blocks(m=16, n=32, k=16, splits=2)  # several tiles and splits per shard
    group = dist.group.WORLD
    res, errors = {}, {}
    h, w, b, y, up = problem(1234)
    lw, lb = local_slice(w, rank, world), local_slice(b, rank, world)
    off = sum(c.shape[0] for c in w.chunk(world)[:rank])
    sl = slice(off, off + lw.shape[0])

    # token_stats and its backward, plain local slices + process_group
    (full, dh, dw, db), (part, pdh, pdw, pdb) = stats_case(backend, h, w, b, y, up, lw, lb, process_group=group)
    for name, a, c in zip(full._fields, full, part):
        res[f"stats.{name}"] = diff(a, c)
    res.update({"stats.dh": diff(dh, pdh), "stats.dw": diff(dw[sl], pdw), "stats.db": diff(db[sl], pdb)})
    # and plain torch on the whole fp64 logits, softcap first, then temperature (docs/math.md §1)
    gh, gw, gb = (t.double().requires_grad_() for t in (h, w, b))
    logp_all = torch.log_softmax(6.0 * torch.tanh((gh @ gw.T + gb) / 6.0) / 0.8, -1)
    g_logp = torch.where(y != -100, logp_all.gather(1, y.clamp(min=0)[:, None])[:, 0], 0.0)
    g_ent = -(logp_all.exp() * logp_all).sum(-1)
    (g_logp * up[0] + g_ent * up[1]).sum().backward()
    hh, ww, bb = leaves(h, lw, lb)
    st = hk.token_stats(hh, ww, y, bias=bb, softcap=6.0, temperature=0.8, backend=backend, process_group=group)
    (st.logp * up[0] + st.entropy * up[1]).sum().backward()
    res.update({"gold.logp": diff(g_logp.detach(), st.logp), "gold.entropy": diff(g_ent.detach(), st.entropy),
                "gold.dh": diff(gh.grad, hh.grad), "gold.dw": diff(gw.grad[sl], ww.grad)})

    # the same through a DTensor weight sharded on the vocabulary (uneven shards)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    dw_t = torch.nn.Parameter(distribute_tensor(w.clone(), mesh, [Shard(0)]))
    db_t = torch.nn.Parameter(distribute_tensor(b.clone(), mesh, [Shard(0)]))
    hh = h.clone().requires_grad_()
    st = hk.token_stats(hh, dw_t, y, bias=db_t, softcap=6.0, temperature=0.8, backend=backend)
    (st.logp * up[0] + st.entropy * up[1] + st.self_certainty * up[2] + st.lse * up[3]).sum().backward()
    res.update({"dtensor.logp": diff(full.logp, st.logp), "dtensor.argmax": diff(full.argmax, st.argmax),
                "dtensor.dh": diff(dh, hh.grad), "dtensor.dw": diff(dw[sl], dw_t.grad.to_local()),
                "dtensor.db": diff(db[sl], db_t.grad.to_local())})
    rep = distribute_tensor(w.clone(), mesh, [Replicate()])
    res["replicated.logp"] = diff(full.logp, hk.token_stats(h, rep, y, bias=b, softcap=6.0, temperature=0.8,
                                                            backend=backend).logp)
    res["tie.argmax_is_first"] = 0.0 if int(part.argmax[3]) == 5 else float("inf")

    # fused_loss with every term, then prg_loss and answer spans
    g = torch.Generator().manual_seed(99)
    terms = dict(rd_weight=torch.rand(N, generator=g) / N, rlif_weight=torch.rand(N, generator=g) / N,
                 advantages=torch.randn(N, generator=g), old_logp=full.logp.detach() + 0.1 * torch.randn(N, generator=g),
                 kl_weight=torch.rand(N, generator=g) * 0.1, ref_logp=full.logp.detach() + 0.3,
                 entropy_weight=torch.rand(N, generator=g) * 0.01)
    got = []
    for weight, bias, extra in ((w, b, {}), (lw, lb, {"process_group": group})):
        hh, ww, bb = leaves(h, weight, bias)
        loss, st = hk.fused_loss(hh, ww, y, bias=bb, softcap=6.0, backend=backend, **terms, **extra)
        (0.7 * loss).backward()
        got.append((loss.detach(), st.logp, st.entropy, hh.grad, ww.grad, bb.grad))
    (l0, lp0, e0, gh0, gw0, gb0), (l1, lp1, e1, gh1, gw1, gb1) = got
    res.update({"fused.loss": diff(l0, l1), "fused.logp": diff(lp0, lp1), "fused.entropy": diff(e0, e1),
                "fused.dh": diff(gh0, gh1), "fused.dw": diff(gw0[sl], gw1), "fused.db": diff(gb0[sl], gb1)})

    spans = torch.arange(N) % 5
    sup = [hk.answer_span_logprobs(h, weight, y, spans, 5, bias=bias, backend=backend, **extra)
           for weight, bias, extra in ((w, b, {}), (lw, lb, {"process_group": group}))]
    res["spans.mean"] = diff(*sup)

    seq_ids = torch.arange(N) % 4
    seq = dict(prg=torch.tensor([0.9, 0.2, 0.6, 0.4]), is_rd=torch.tensor([True, False, True, False]),
               rewards=torch.tensor([0.0, 1.0, 0.0, 2.0]), group_ids=torch.tensor([0, 1, 0, 1]))
    pl = []
    for weight, extra in ((w, {}), (lw, {"process_group": group})):
        ww = weight.detach().clone().requires_grad_()
        loss, _ = hk.prg_loss(h, ww, y, seq_ids, backend=backend, **seq, **extra)
        loss.backward()
        pl.append((loss.detach(), ww.grad))
    res.update({"prg_loss.loss": diff(pl[0][0], pl[1][0]), "prg_loss.dw": diff(pl[0][1][sl], pl[1][1])})

    # the collectives of one vocab-parallel fused_loss call, for bench/COMM.md's count
    calls = []
    with recording(calls):
        hh, ww = leaves(h, lw)
        hk.fused_loss(hh, ww, y, rd_weight=1.0 / N, backend=backend, process_group=group)[0].backward()

    # the same call with no rows (on every rank): a zero loss, empty statistics, zero gradients,
    # and the collectives of the call above in the same order, on empty tensors
    empty_calls = []
    with recording(empty_calls):
        hh, ww = leaves(h[:0], lw)
        loss, st = hk.fused_loss(hh, ww, y[:0], rd_weight=1.0 / N, backend=backend, process_group=group)
        loss.backward()
    shapes_ok = hh.grad.shape == (0, D) and ww.grad.shape == lw.shape and st.logp.shape == (0,)
    res.update({"empty.loss": abs(loss.item()), "empty.dw": ww.grad.abs().max().item(),
                "empty.shapes": 0.0 if shapes_ok else float("inf")})
    hh = h[:0].clone().requires_grad_()
    dw_t.grad = None
    st = hk.token_stats(hh, dw_t, y[:0], bias=db_t, backend=backend)
    (st.logp.sum() + st.entropy.sum()).backward()
    res["empty.dtensor_dw"] = dw_t.grad.to_local().abs().max().item()

    # bad calls: a clear error on every rank, no hang
    def expect_error(name, fn):
        try:
            fn()
            errors[name] = "no error"
        except (ValueError, TypeError) as exc:
            errors[name] = str(exc)

    expect_error("hidden_differs", lambda: hk.token_stats(h + rank, lw, y, backend=backend, process_group=group))
    expect_error("dtensor_and_group", lambda: hk.token_stats(h, dw_t, y, backend=backend, process_group=group))
    expect_error("dtensor_shard1", lambda: hk.token_stats(h, distribute_tensor(w.clone(), mesh, [Shard(1)]), y,
                                                          backend=backend))
    bad = y.clone()
    bad[1] = V  # out of the global range, though inside no shard
    expect_error("target_range", lambda: hk.token_stats(h, lw, bad, backend=backend, process_group=group))
    rows = slice(0, 0 if rank == 0 else N)  # no rows on rank 0 only: a clear error, no rank left waiting
    expect_error("one_rank_empty", lambda: hk.token_stats(h[rows], lw, y[rows], backend=backend, process_group=group))

    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"diffs": res, "errors": errors, "local_vocab": lw.shape[0], "collectives": calls,
                   "empty_collectives": empty_calls}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    run(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5])
    sys.stdout.flush()
    # Skip interpreter teardown: a gloo/Triton-interpreter thread torn down at exit can abort
    # ("terminate called without an active exception") after all the work is written.
    os._exit(0)
