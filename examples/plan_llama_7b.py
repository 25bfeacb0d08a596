"""Will one training step of a Llama-2-7B-shaped model fit an 80 GB GPU? Planned on the meta device:
no weights, no memory, a few seconds on a laptop."""

import remat
import remat.app.zoo

built = remat.app.zoo.build("llama-7b", batch=8, seq=4096, dtype="bfloat16", device="meta")
profile = remat.profile(built.model, built.inputs, device="meta", throughput="h100")
print(f"fixed memory: {profile.fixed_summary()}")
none = remat.solve(profile, None, strategy="none")
print(f"without checkpointing: {remat.format_bytes(none.peak_bytes)}")
try:
    plan = remat.solve(profile, "80GiB")
    print(plan.summary())
except remat.InfeasibleBudgetError as e:
    print(e)
