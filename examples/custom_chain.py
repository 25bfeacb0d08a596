"""The planners need no model and no torch: describe a chain with numbers and plan it."""

from remat import Profile, frontier, solve

MiB = 2**20
# 24 transformer-like blocks: 64 MiB hidden state in, 600 MiB kept when recorded; a head that needs 2 GiB.
n = 24
profile = Profile.from_lists(
    x_bytes=[64 * MiB] * (n + 1),
    xbar_bytes=[600 * MiB] * n + [0],
    fwd_s=[0.010] * n + [0.020],
    bwd_s=[0.020] * n + [0.040],
    bwd_transient_bytes=[128 * MiB] * n + [2048 * MiB],
    fixed_bytes=4096 * MiB,
)
for strategy in ("none", "every", "sqrt", "revolve"):
    print(solve(profile, None, strategy=strategy).summary())
print(solve(profile, "8GiB"))
print("frontier (peak GiB, step s):", [(round(p.peak_bytes / 2**30, 2), round(p.time_s, 3)) for p in frontier(profile)])
