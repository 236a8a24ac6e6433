"""Dropout masks: integer ops per mask element in the lowered program and CPU time, before / after.

"before" is the mask definition piccolo-jax used up to this version, jax.random.bernoulli(token_key, p, shape)
bit for bit, computed as the unrolled threefry-2x32 it is (20 rounds of add / rotate / xor, key injections,
then jax.random.uniform's float construction); written out here because it is no longer in the library.
"after" is `piccolo_jax.model.dropout` (one `triple32` hash per element, an integer compare).

Ops per element: the elementwise StableHLO ops whose result has the mask's full shape (integer or boolean),
i.e. the work done once per mask element; per-token work (key derivation, [B, T]) is not counted.
Times: medians of interleaved runs of the jitted mask functions, on this machine's CPU.

    python benchmarks/bench_dropout.py            # BERT-base attention masks (B 16, 12 heads, T 128) and hidden
    python benchmarks/bench_dropout.py --quick    # B 4
"""

from __future__ import annotations

import os
import re
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if not __package__:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from benchmarks.common import interleaved, median, spread, timeit  # noqa: E402
from piccolo_jax.model import dropout  # noqa: E402


def _threefry2x32(k0, k1, x0, x1):
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    ks = (k0, k1, k0 ^ k1 ^ jnp.uint32(0x1BD11BDA))
    x0, x1 = x0 + ks[0], x1 + ks[1]
    for i in range(5):
        for r in rotations[i % 2]:
            x0 = x0 + x1
            x1 = ((x1 << jnp.uint32(r)) | (x1 >> jnp.uint32(32 - r))) ^ x0
        x0 = x0 + ks[(i + 1) % 3]
        x1 = x1 + ks[(i + 2) % 3] + jnp.uint32(i + 1)
    return x0, x1


def _uniform_below(bits1, bits2, p):
    bits = bits1 ^ bits2
    u = jax.lax.bitcast_convert_type((bits >> jnp.uint32(9)) | jnp.uint32(0x3F800000), jnp.float32) - 1.0
    return u < jnp.float32(p)


def before_attention(token_keys_bt, positions_bs, p, n, m):
    b, t = token_keys_bt.shape
    s = positions_bs.shape[1]
    kd = jax.random.key_data(token_keys_bt)[:, None, :, None, :]
    heads = jax.lax.broadcasted_iota(jnp.uint32, (b, n, t, s), 1)
    counter = heads * jnp.uint32(m) + positions_bs.astype(jnp.uint32)[:, None, None, :]
    return _uniform_below(*_threefry2x32(kd[..., 0], kd[..., 1], jnp.zeros_like(counter), counter), p)


def before_hidden(token_keys, p, width):
    kd = jax.random.key_data(token_keys)[..., None, :]
    counter = jax.lax.broadcasted_iota(jnp.uint32, (*token_keys.shape, width), token_keys.ndim)
    return _uniform_below(*_threefry2x32(kd[..., 0], kd[..., 1], jnp.zeros_like(counter), counter), p)


def ops_per_element(fn, args, shape) -> int:
    """Elementwise StableHLO ops producing a tensor of the mask's full shape."""
    text = jax.jit(fn).lower(*args).as_text()
    dims = "x".join(str(d) for d in shape)
    full = re.compile(rf"= stablehlo\.(\w+).*-> tensor<{dims}x(?:ui32|i32|i1|f32)>|"
                      rf"= stablehlo\.(\w+) [^:]*: tensor<{dims}x(?:ui32|i32|i1|f32)>$")
    skip = {"broadcast_in_dim", "iota", "constant", "convert", "reshape", "transpose"}
    n = 0
    for line in text.splitlines():
        hit = full.search(line.strip())
        if hit and (hit.group(1) or hit.group(2)) not in skip:
            n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="batch 4 instead of 16")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    b, n, t, d, m, p = (4 if args.quick else 16), 12, 128, 768, 512, 0.9
    rows = dropout.row_keys(jax.random.key(0), jnp.arange(b))
    token_keys = jax.vmap(lambda k: jax.vmap(lambda i: jax.random.fold_in(k, i))(jnp.arange(t)))(rows)  # [B, T]
    seeds = dropout.key_seed(token_keys)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    cases = {
        f"attention probs [{b}, {n}, {t}, {t}]": (
            (lambda k, q: before_attention(k, q, p, n, m), (token_keys, positions)),
            (lambda s, q: dropout.keep_attention(s, q, p, n, m), (seeds, positions)), (b, n, t, t)),
        f"hidden [{b}, {t}, {d}]": (
            (lambda k: before_hidden(k, p, d), (token_keys,)),
            (lambda s: dropout.keep_hidden(s, p, d), (seeds,)), (b, t, d)),
    }
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}; medians of {args.reps} interleaved runs")
    print(f"{'mask':<32} {'ops/elem before':>15} {'after':>6} {'fewer':>6} {'ms before':>10} {'ms after':>9} "
          f"{'speed-up':>9}")
    for name, ((f_old, a_old), (f_new, a_new), shape) in cases.items():
        ops_old, ops_new = ops_per_element(f_old, a_old, shape), ops_per_element(f_new, a_new, shape)
        j_old, j_new = jax.jit(f_old), jax.jit(f_new)
        times = interleaved({"before": lambda: timeit(lambda: j_old(*a_old), jax.block_until_ready),  # noqa: B023
                             "after": lambda: timeit(lambda: j_new(*a_new), jax.block_until_ready)},  # noqa: B023
                            reps=args.reps)
        t_old, t_new = median(times["before"]) * 1e3, median(times["after"]) * 1e3
        print(f"{name:<32} {ops_old:>15} {ops_new:>6} {ops_old / ops_new:>5.1f}x {t_old:>10.2f} {t_new:>9.2f} "
              f"{t_old / t_new:>8.1f}x   (spread {spread(times['before'])} / {spread(times['after'])})")


if __name__ == "__main__":
    main()
