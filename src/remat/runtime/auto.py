"""``remat.auto``: profile, solve, apply and check, in one call."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from remat.errors import InfeasibleBudgetError, RematError, VerificationError
from remat.planning.budget import Budget, absolute_bytes
from remat.planning.plan import Plan
from remat.planning.profile import Profile
from remat.planning.simulate import simulate
from remat.planning.solve import solve
from remat.runtime import hf
from remat.runtime.distributed import plan_for_job
from remat.runtime.executor import applied_state, apply, remove
from remat.runtime.head import whole_heads
from remat.runtime.measure import measure, optimizer_step_bytes
from remat.runtime.ops import add_options
from remat.runtime.optimizer import Spec, optimizer_state_bytes
from remat.runtime.profiler import preserved, profile
from remat.runtime.regions import suspended
from remat.runtime.step import Autocast, Step, autocast_for, training
from remat.runtime.timeline import Throughput
from remat.units import format_bytes

__all__ = ["auto"]

log = logging.getLogger("remat")


def auto(
    model: nn.Module, example_inputs: Any, *, budget: Budget, loss_fn: Callable[[Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | Spec | None = None, strategy: str = "auto", stages: Sequence[str] | None = None,
    repeats: int = 3, sizes: str = "auto", verify: bool | str = True, progress: bool | None = None,
    block_options: bool = False, throughput: Throughput | str | None = None, autocast: Any = None, head: str = "keep",
    **options: Any,
) -> nn.Module:
    """Make one training step of ``model`` fit ``budget`` at the least extra time: profile, solve, apply,
    and check the planned step once.

    Args:
        model: a transformers model works as is (with labels in the inputs). Planned and checked in
            training mode, as it trains; a model in evaluation mode is switched back after.
        example_inputs: a batch of the shape you will train on: a tensor, a tuple, or a dict of kwargs.
        budget: peak bytes of the step: ``"6GiB"``, an int, or a share of the no-checkpointing peak.
        loss_fn: ``loss_fn(output) -> scalar`` when the model does not return its loss.
        optimizer: the optimizer whose state must fit in the budget too: an instance, or a name
            (``"adamw"``, ``"adam"``, ``"sgd-momentum"``, ...); its state is counted by the parameters'
            dtypes (:func:`remat.optimizer_state_bytes`).
        strategy: ``"auto"`` (optimal), or any name of :func:`remat.strategies`.
        stages, repeats, throughput, sizes: see :func:`remat.profile` (``repeats=0`` and a ``throughput``:
            estimated times); no profiling run exceeds the budget or the free memory (but on a model already sharded).
        verify: True (default): run the planned step once (:func:`remat.measure`), the output held through
            backward; :class:`remat.VerificationError` if its peak, optimizer state included, exceeds the
            budget. ``"grads"``: also compare loss and gradients with the plain model's: bit for bit, or,
            with the head in chunks (summed in another order), within floating-point tolerance (the log
            says which comparison it made).
        progress: a progress bar while profiling; None: when stderr is a terminal.
        block_options: also give the planner selective options inside blocks (:func:`remat.add_options`).
        autocast: the forward's dtype under ``torch.autocast`` (``torch.bfloat16``); default: the block
            open now, if any; False: none. A call under another autocast is refused when planned.
        head: ``"keep"`` (default): the model's head as it is. ``"chunked"``: the planner may run the output
            projection and the loss in chunks of tokens, each recomputed in backward, choosing how many with
            the blocks' plan (:func:`remat.profile`; a transformers causal LM or a :class:`remat.ChunkedHead`).
            A transformers model planned so returns its loss and ``logits=None`` when called with labels.

    Returns:
        The same model, planned in place (:func:`remat.remove` undoes it; :func:`remat.plan_of`: the plan).

    Raises:
        InfeasibleBudgetError: the budget is below the smallest feasible peak (the message says it).
        VerificationError: the planned step failed its check; the plan is removed.

    Hugging Face models: as :func:`remat.apply` (their own checkpointing off, ``use_cache`` False).
    """
    ac = _checked(model, verify, autocast)
    with training(model):
        plan = _applied(model, functools.partial(_profiled, model, example_inputs, optimizer=optimizer, loss_fn=loss_fn,
                                                 stages=stages, throughput=throughput, autocast=ac or False,
                                                 head=head),
                        budget, strategy, options, block_options=block_options, repeats=repeats, sizes=sizes,
                        progress=progress)
        if verify:
            _verify(Step.of(model, example_inputs, loss_fn, ac), plan, optimizer, grads=verify == "grads")
    return model


def _checked(model: nn.Module, verify: bool | str, autocast: Any) -> Autocast | None:
    """``auto``'s arguments checked; the step's autocast."""
    if verify not in (True, False, "grads"):
        raise RematError(f"remat.auto: verify={verify!r}; use True, False or 'grads'")
    return autocast_for(model, autocast, "remat.auto")


def _applied(model: nn.Module, profiled: Callable[..., Profile], budget: Budget, strategy: str,
             options: dict[str, Any], **kwargs: Any) -> Plan:
    """Profile, solve and apply; the plan."""
    with _checkpointing_back_on_failure(model):
        prof = profiled(budget, **kwargs)
        plan = _solved_or_named(prof, budget, strategy, options, lambda limit: profiled(
            limit, **{**kwargs, "block_options": False, "sizes": "fake", "progress": False}))
    apply(model, plan)
    _log_summary(prof, plan)
    return plan


@contextlib.contextmanager
def _checkpointing_back_on_failure(model: nn.Module) -> Iterator[None]:
    """Switch off transformers' own checkpointing to profile the chain a plan runs; switched on again if
    no plan is applied (an infeasible budget), so that the caller's fallback still checkpoints."""
    was = hf.checkpointing_active(model)
    hf.disable_checkpointing(model, "remat.auto")
    try:
        yield
    except BaseException:
        if was:
            model.gradient_checkpointing_enable()  # type: ignore[operator]
        raise


def _solved(prof: Profile, budget: Budget, strategy: str, options: dict[str, Any]) -> Plan:
    """The plan; in a distributed job, one plan for every rank (rank 0 solves; profiles that differ
    between ranks raise on every rank instead of hanging the job)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return plan_for_job(prof, budget, strategy=strategy, **options)
    return solve(prof, budget, strategy=strategy, **options)


def _solved_or_named(prof: Profile, budget: Budget, strategy: str, options: dict[str, Any],
                     fake: Callable[[int], Profile]) -> Plan:
    """The plan; an infeasible budget names a least feasible peak that plans when given back in bytes.

    Note: [A least that holds] A share budget is sized on the measured step; a byte budget below the plain
    peak is sized on a fake copy (Note [Memory-safe profiling]), which may keep a little more (what the fake
    copy misses is measured on the device within the budget: Note [What the fake copy misses]). The least
    named for a share budget is what the byte budget it names would need: the fake copy is sized as that
    budget sizes it, and raised until it holds."""
    try:
        return _solved(prof, budget, strategy, options)
    except InfeasibleBudgetError as e:
        if prof.meta.get("sizes") != "measured" or prof.device == "meta" or e.min_feasible_bytes is None:
            raise
        least, named = e.min_feasible_bytes, e
        for _ in range(3):
            try:
                _solved(fake(least), e.budget_bytes, strategy, options)
            except InfeasibleBudgetError as by_fake:
                if (by_fake.min_feasible_bytes or 0) <= least:
                    break
                least, named = by_fake.min_feasible_bytes or least, by_fake
            except RematError:  # the fake copy cannot run the step: byte budgets measure it as share budgets do
                break
        if named is e:
            raise
        raise named from None


def _profiled(model: nn.Module, example_inputs: Any, budget: Budget, *,
              optimizer: torch.optim.Optimizer | Spec | None, block_options: bool, **kwargs: Any) -> Profile:
    """The profile, with the optimizer's state in its fixed memory (and block options if asked); no
    profiling run above the budget."""
    state = optimizer_state_bytes(model, optimizer) if optimizer is not None else 0
    cap = absolute_bytes(budget)
    prof = profile(model, example_inputs, limit_bytes=None if cap is None else max(0, cap - state), **kwargs)
    if block_options and prof.device != "meta":
        prof = add_options(prof, model, example_inputs, stages=kwargs["stages"], repeats=max(1, kwargs["repeats"]),
                           autocast=kwargs["autocast"])
    if optimizer is None:
        return prof
    label = optimizer if isinstance(optimizer, str) else f"{type(optimizer).__name__} state"
    prof = prof.with_extra_fixed(optimizer_state_bytes(model, optimizer, device=prof.device), label)
    return dataclasses.replace(prof, after_backward_bytes=optimizer_step_bytes(model, optimizer))


def _verify(step: Step, plan: Plan, optimizer: torch.optim.Optimizer | Spec | None, *, grads: bool) -> None:
    """Run the planned step once (after one warm-up, so gradients count from the start, as planned), the
    output held through backward as a loop holds it, and check its peak against the budget; with
    ``grads``, check it against the plain model bit for bit."""
    model = step.model
    cuda = any(p.is_cuda for p in model.parameters())
    try:
        with preserved(model, cuda):
            m = measure(step, model=model, inputs=step.inputs, optimizer=optimizer, warmup=1, repeats=0)
    except Exception as e:
        remove(model)
        raise VerificationError(
            f"remat.auto: the planned step failed when run once to check it ({type(e).__name__}: {e}); the plan was"
            " removed. Please report the model to remat"
        ) from e
    budget = plan.budget_bytes
    if budget is not None and m.peak_bytes > budget:
        remove(model)
        raise VerificationError(
            f"remat.auto: the planned step measured a peak of {format_bytes(m.peak_bytes)}, over the budget of"
            f" {format_bytes(budget)} (predicted {format_bytes(plan.prediction.peak_bytes)}); the plan was removed."
            " Profile with sizes='measured' if the step fits on the device, or give stages=[...]; please report"
            " the model to remat"
        )
    log.info("remat.auto: checked: the planned step, its output held through backward, measured a peak of %s"
             " (%d B; budget %s, predicted %s)", format_bytes(m.peak_bytes), m.peak_bytes,
             format_bytes(budget) if budget is not None else "none", format_bytes(plan.prediction.peak_bytes))
    if grads:
        _compare_gradients(model, step, cuda)


def _compare_gradients(model: nn.Module, step: Step, cuda: bool) -> None:
    """Note: [Comparing gradients] The planned step against the plain model on the same batch and seed: the
    plan removed (suspended), and, like the plan, with transformers' cache off. Where the model's own config
    has its cache on, the plain step is also run as the user has it, and a difference there is reported as
    what it is: transformers takes another code path with the cache on (its own checkpointing turns the cache
    off too), not recomputation. A difference from the cache-off plain step is recomputation that is not
    bit-exact: refused, naming the parameters and by how much."""
    state = applied_state(model)
    chunks = state.plan.head_chunks if state is not None else None
    with preserved(model, cuda):
        planned = _seeded_grads(model, step)
        # LayerDrop skips as in the planned run; a head the plan runs in chunks, whole
        with suspended(model, layerdrop=False), whole_heads(model) if chunks else contextlib.nullcontext():
            plain = _seeded_grads(model, step)
            with hf.users_cache(state.hf_state) if state is not None else contextlib.nullcontext(False) as other:
                as_user = _seeded_grads(model, step) if other else None
    if chunks:
        _compare_within_tolerance(model, planned, plain, chunks)
        return
    gap = _difference(planned, plain)
    if gap:
        remove(model)
        raise VerificationError(
            f"remat.auto: the planned step's {gap} differ from the plain model's: recomputing the blocks is not"
            " bit-exact for this model; the plan was removed. Train without verify='grads' if a difference of this"
            " size is acceptable (transformers' own checkpointing recomputes the same way), or report the model"
        )
    log.info("remat.auto: checked: loss and %d gradients bitwise equal to the plain model's", len(plain[1]))
    user_gap = _difference(planned, as_user) if as_user is not None else ""
    if user_gap:
        log.warning(
            "remat.auto: with the model's own use_cache=True, the plain step's %s differ from the planned one's;"
            " without the cache (as remat and transformers' own checkpointing train it) they are bitwise equal:"
            " transformers computes another way when its cache is on", user_gap)


Grads = tuple[torch.Tensor, dict[str, torch.Tensor | None]]


def _compare_within_tolerance(model: nn.Module, planned: Grads, plain: Grads, chunks: int) -> None:
    """Note: [Comparing a chunked head] The head in chunks sums the loss and its gradients in another order
    (Rule 2 of Note [Chunked head] in remat.runtime.head), so it is compared with the plain model (the head
    whole) within tolerance, not bit for bit: each tensor's largest difference against ``rtol`` times its
    largest value, ``rtol`` = max(1e-5, 16 eps) of its dtype (1e-5 in fp32, 0.125 in bf16)."""
    pairs = [("loss", planned[0], plain[0]), *((n, planned[1][n], g) for n, g in plain[1].items())]
    gaps = [(name, _relative_gap(a, b), _rtol(b)) for name, a, b in pairs]
    over = [(name, gap) for name, gap, rtol in gaps if not gap <= rtol]
    if over:
        remove(model)
        names = ", ".join(f"{n} ({g:.3g})" for n, g in over[:3])
        raise VerificationError(
            f"remat.auto: with the head in {chunks} chunks, {len(over)} of {len(gaps)} tensors (loss and gradients)"
            f" differ from the plain model's beyond floating-point tolerance: {names}, as a share of each one's largest"
            " value;"
            " the plan was removed. Plan with head='keep', or report the model")
    name, gap, _ = max(gaps, key=lambda g: g[1])
    log.info("remat.auto: checked within floating-point tolerance, not bit for bit (the head in %d chunks sums in"
             " another order): loss and %d gradients at most %.3g of their largest value from the plain model's"
             " (in %s)", chunks, len(plain[1]), gap, name)


def _relative_gap(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    """The largest difference between ``a`` and ``b`` as a share of ``b``'s largest value (inf: one is None)."""
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    return float(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item())


def _rtol(t: torch.Tensor | None) -> float:
    if t is None or not t.dtype.is_floating_point:
        return 0.0
    return max(1e-5, 16 * torch.finfo(t.dtype).eps)


def _seeded_grads(model: nn.Module, step: Step) -> Grads:
    for p in model.parameters():
        p.grad = None
    torch.manual_seed(0)
    loss = step()
    return loss, {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _difference(a: Grads, b: Grads) -> str:
    """How two runs' loss and gradients differ, in words ("" when bitwise equal)."""
    (la, ga), (lb, gb) = a, b
    diffs = [n for n, g in gb.items() if not _same(g, ga[n])]
    parts = [] if torch.equal(la, lb) else [f"loss ({la.item():.9g} vs {lb.item():.9g})"]
    if diffs:
        worst = (float("nan"), "a gradient present in one run only")
        for n in diffs:
            x, y = ga[n], gb[n]
            if x is not None and y is not None and not (worst[0] >= (gap := (x - y).abs().max().item())):
                worst = (gap, n)
        parts.append(f"{len(diffs)} of {len(gb)} gradients ({', '.join(diffs[:3])}{', ...' if len(diffs) > 3 else ''};"
                     f" at most {worst[0]:.3g} apart, in {worst[1]})")
    return " and ".join(parts)


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


def _log_summary(prof: Profile, plan: Plan) -> None:
    none = simulate(prof, solve(prof, None, strategy="none"))
    p = plan.prediction
    blocks = [prof.names[k] for k in prof.block_indices()]
    log.info(
        "remat.auto: %d stages (%s%s); budget %s; predicted peak %s vs %s without checkpointing;"
        " +%.1f%% step time (strategy %s, %d regions; sizes %s, times %s)",
        len(prof.stages), f"{blocks[0]} .. {blocks[-1]}" if blocks else "no blocks",
        f", {len(blocks)} blocks" if blocks else "", format_bytes(plan.budget_bytes or 0),
        format_bytes(p.peak_bytes), format_bytes(none.peak_bytes), 100 * p.overhead, plan.strategy,
        sum(1 for _ in plan.regions()), prof.meta.get("sizes", "measured"), prof.meta.get("times", "measured"),
    )
