"""The ``remat`` command: ``remat demo``, ``remat plan``, ``remat profile``.

Torch is imported only inside the subcommands that need it, so ``remat --help`` and ``remat --version``
are instant. Every argument is checked before any work starts (profiling a large model takes a while):
a mistake is one line, ``remat: error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from typing import Any, NoReturn

from remat.app.catalog import DTYPE_BYTES, MODELS, check_request, check_spec, config_spec, parse_model
from remat.errors import RematError
from remat.planning.budget import parse_budget
from remat.planning.profile import Profile
from remat.planning.solve import frontier, min_feasible_peak, min_feasible_plan, solve
from remat.planning.strategies import strategies
from remat.units import format_bytes, format_seconds

__all__ = ["main"]

#: Defaults of the options that build a model (None in the parsed arguments means "not given").
MODEL_DEFAULTS: dict[str, Any] = {"batch": 8, "seq": 1024, "dtype": "float32", "device": "meta",
                                  "throughput": "h100", "repeats": 3, "head": "keep"}

#: What ``--head`` accepts: :data:`remat.runtime.head.HEADS` (a test checks that they agree).
HEAD_NAMES = ("keep", "chunked")

#: Names of :data:`remat.runtime.profiler.THROUGHPUTS`, here so that ``--help`` needs no torch (a test
#: checks that they agree).
THROUGHPUT_NAMES = ("h200", "h100", "a100", "l4", "cpu")

#: What ``--optimizer`` accepts: :data:`remat.runtime.optimizer.OPTIMIZERS` (a test checks that they agree).
OPTIMIZER_NAMES = ("none", "sgd", "sgd-momentum", "adam", "adamw")

BUDGET_HELP = ("peak memory of one training step, fixed memory included: a size ('80GiB', '6GB', '750MiB')"
               " or a byte count, or a share of the peak without checkpointing ('50%%', '0.5')")


USER_MODELS = """\
your own model (remat plan MODEL, remat profile MODEL):
  FILE.py:FUNCTION or module:FUNCTION (a module importable from the current directory or installed)
    FUNCTION returns the model, (model, inputs) or (model, inputs, loss_fn). It is passed, by name, those of
    batch, seq, dtype (a torch.dtype) and device (a str) that it has as parameters, and called under
    `with torch.device(device)`, so that on meta nothing is allocated; the model and the inputs are then
    moved to --device. inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs;
    loss_fn(output) -> scalar (default: output.loss, a scalar output, or output.sum()). A model returned
    alone must be a transformers language model: it is fed --batch x --seq token ids (labels the same).
    --dtype given to a function without a dtype parameter casts the model and floating-point inputs;
    --batch or --seq given to one that makes its own inputs without such a parameter is refused.
  path/to/config.json (or the directory holding it): a transformers config, built with random weights by
    AutoModelForCausalLM.from_config (nothing downloaded) and fed --batch x --seq token ids.
"""


class UsageError(RematError):
    """A command line remat refuses before doing any work."""


def _print(*args: Any) -> None:
    print(*args, flush=True)


# ---- checks: before any work ---------------------------------------------------------------------------------


def _positive(flag: str) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < 1:
            why = " (steps are timed on cpu and cuda; on meta times are estimated)" if flag == "--repeats" else ""
            raise argparse.ArgumentTypeError(f"must be 1 or more, got {value}{why}")
        return value

    return parse


def _check_device(text: str) -> str:
    match = re.fullmatch(r"(meta|cpu|cuda)(:\d+)?", text.strip())
    if match is None or (match.group(2) and match.group(1) != "cuda"):
        raise UsageError(f"--device {text}: not a device remat runs on; use meta (plan without allocating"
                         " anything), cpu, cuda or cuda:N")
    if match.group(1) == "cuda":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(match.group(2)[1:]) if match.group(2) else 0
        if index >= count:
            found = f"{count} CUDA device(s)" if count else f"no CUDA device (torch {torch.__version__})"
            raise UsageError(f"--device {text}: this machine has {found}; use --device meta to plan without"
                             " a GPU, or --device cpu")
    return text.strip()


def _check_budget(text: str) -> None:
    """Parse the budget the way :func:`remat.solve` will, against a stand-in chain: mistakes now, not after
    profiling (what a share comes to is known only then)."""
    parse_budget(text, Profile.from_lists([1, 1], [1, 0], [1.0, 1.0], [1.0, 1.0]))


def _check_output(path: str, flag: str, *, png: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work: the file is opened for writing (and
    removed again if it did not exist), so what the system refuses (a read-only or virtual file system,
    permissions, even as root) is found now, not after profiling."""
    if not path:
        raise UsageError(f"{flag} '': an empty path; give a file name" + (" ending in .png" if png else ""))
    if png and not path.lower().endswith(".png"):
        raise UsageError(f"{flag} {path}: the frontier is written as a PNG image; give a path ending in .png")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a directory; give a file name")
    if not os.path.isdir(parent):
        why = "is not a directory" if os.path.exists(parent) else "does not exist"
        raise UsageError(f"{flag} {path}: {parent} {why}; give a path in an existing directory")
    existed = os.path.exists(path)
    try:
        with open(path, "ab" if existed else "xb"):
            pass
        if not existed:
            os.remove(path)
    except OSError as e:
        raise UsageError(f"{flag} {path}: cannot be written ({e.strerror or e}); give a path in a writable"
                         " directory") from e


#: What ``--profile`` expects, for its error messages.
PROFILE_EXPECTED = "expected a profile JSON written by `remat profile MODEL -o FILE`"


def _read_profile(path: str) -> Profile:
    """The profile saved at ``path``; anything else is a :class:`UsageError` naming the file and what it is."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
            if b"\0" in head or not _utf8_prefix(head):
                raise UsageError(f"--profile {path}: a binary file, not a profile; {PROFILE_EXPECTED}")
            text = (head + f.read()).decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--profile {path}: not UTF-8 text ({e.reason} at byte {e.start}), not a profile;"
                         f" {PROFILE_EXPECTED}") from e
    except OSError as e:
        raise UsageError(f"--profile {path}: cannot be read ({e.strerror or e}); {PROFILE_EXPECTED}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UsageError(f"--profile {path}: not JSON ({e}), not a profile; {PROFILE_EXPECTED}") from e
    if not isinstance(data, dict) or "stages" not in data or str(data.get("format")).startswith("remat.Plan"):
        what = (f"a JSON {type(data).__name__}" if not isinstance(data, dict)
                else "a plan (`remat plan --json` writes plans)" if "stages" in data
                else f"a JSON object without 'stages' (its keys: {', '.join(map(str, data)) or 'none'})")
        raise UsageError(f"--profile {path}: {what}, not a profile; {PROFILE_EXPECTED}")
    try:
        return Profile.from_dict(data)
    except (RematError, ValueError, TypeError, KeyError, AttributeError) as e:
        why = str(e).removeprefix("Profile.from_json: ") or type(e).__name__
        raise UsageError(f"--profile {path}: {why}" + ("" if "expected" in why else f"; {PROFILE_EXPECTED}")) from e


def _utf8_prefix(head: bytes) -> bool:
    """Whether ``head``, the start of a file, is UTF-8 text (a character cut at its end allowed)."""
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 3 and e.reason == "unexpected end of data"
    return True


def _check_model_args(args: argparse.Namespace) -> None:
    """With --profile, no model options; without, a model the catalog can serve. Fills the defaults."""
    given = [f"--{k}" for k in MODEL_DEFAULTS if getattr(args, k, None) is not None]
    if getattr(args, "profile", None):
        if args.model or given:
            extra = ([f"model {args.model!r}"] if args.model else []) + given
            raise UsageError(f"--profile {args.profile} plans a saved profile, whose model and shapes are fixed;"
                             f" {', '.join(extra)} would be ignored: drop {'it' if len(extra) == 1 else 'them'},"
                             " or drop --profile")
        if not os.path.isfile(args.profile):
            why = "is a directory" if os.path.isdir(args.profile) else "no such file"
            raise UsageError(f"--profile {args.profile}: {why}; {PROFILE_EXPECTED}")
        args.loaded_profile = _read_profile(args.profile)
        return
    args.given = {k for k in MODEL_DEFAULTS if getattr(args, k) is not None}
    for k, v in MODEL_DEFAULTS.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if not args.model:
        raise UsageError(f"remat {args.command}: name a model ({', '.join(MODELS)}; or FILE.py:FUNCTION,"
                         " module:FUNCTION, a transformers config.json)"
                         + (" or pass --profile FILE" if args.command == "plan" else ""))
    kind, where, _ = parse_model(args.model)
    if kind == "builtin":
        check_request(args.model, batch=args.batch, seq=args.seq, dtype=args.dtype)
    elif kind == "config":  # its shape, without torch: positions and sizes checked as a built-in's
        check_spec(config_spec(where), batch=args.batch, seq=args.seq, dtype=args.dtype)
    args.device = _check_device(args.device)
    args.user = None


def _check_user_model(args: argparse.Namespace) -> None:
    """The last check, after the cheap ones: a user's model function imported and found, its parameters
    ones remat can give; a config one that transformers builds."""
    if not getattr(args, "profile", None) and parse_model(args.model)[0] != "builtin":
        from remat.app.zoo import user_model

        args.user = user_model(args.model, batch=args.batch, seq=args.seq, dtype=args.dtype)


def _check_plan_args(args: argparse.Namespace) -> None:
    _check_model_args(args)
    _check_budget(args.budget)
    known = strategies()
    if args.strategy not in known:
        raise UsageError(f"--strategy {args.strategy!r}: unknown; use one of {', '.join(known)}")
    if args.json and args.frontier:
        raise UsageError("--json prints only the plan, for programs, and --frontier a table for people: use one"
                         " (remat.frontier gives the frontier's plans in Python)")
    if args.plot is not None:
        _check_output(args.plot, "--plot", png=True)
    if args.fsdp and getattr(args, "head", None) == "chunked":
        raise UsageError("--fsdp with --head chunked is not planned yet (FSDP2 unshards the head's weight per chunk):"
                         " drop one of them")
    if args.fsdp and args.profile:
        raise UsageError("--fsdp plans from the model itself (its parameters' shapes): give a model, not --profile")
    _check_user_model(args)


# ---- remat plan / remat profile ------------------------------------------------------------------


def _profile_model(args: argparse.Namespace, quiet: bool) -> tuple[Profile, str]:
    """Build the model and profile it; its optimizer state per name (exact, in the parameters' dtype)
    goes into the profile's meta, so that a saved profile keeps it."""
    from remat.app import zoo
    from remat.runtime.measure import optimizer_step_bytes
    from remat.runtime.optimizer import OPTIMIZERS, optimizer_state_bytes
    from remat.runtime.profiler import profile

    sizes = dict(batch=args.batch, seq=args.seq, dtype=args.dtype, device=args.device)
    built = args.user.build(**sizes, given=args.given) if args.user else zoo.build(args.model, **sizes)
    t0 = time.perf_counter()
    prof = profile(built.model, built.inputs, loss_fn=built.loss_fn, device=args.device,
                   throughput=args.throughput, progress=sys.stderr.isatty() and not quiet,
                   repeats=args.repeats, head=args.head)
    state = {name: optimizer_state_bytes(built.model, name, device=args.device) for name in OPTIMIZERS}
    # The step's temporaries (Note [The optimizer's step]); on meta, as on the GPU planned for (multi-tensor).
    steps = {name: optimizer_step_bytes(built.model, name, foreach=True if args.device == "meta" else None)
             for name in OPTIMIZERS}
    fsdp = getattr(args, "fsdp", None)
    if fsdp:  # one rank's share: FSDP2 over `fsdp` ranks (each block and the root sharded)
        from remat.runtime.distributed import fsdp_profile

        prof = fsdp_profile(prof, built.model, fsdp)
        state = {name: -(-v // fsdp) for name, v in state.items()}
        steps = {name: -(-v // fsdp) for name, v in steps.items()}
    prof = dataclasses.replace(prof, meta={**prof.meta, "optimizer_state_bytes": state, "optimizer_step_bytes": steps})
    where = (f"on meta (no memory used; times estimated for {args.throughput})" if args.device == "meta"
             else f"on {args.device}")
    desc = (f"{args.model}: {built.description}; {built.shapes}; profiled {where}"
            f" in {time.perf_counter() - t0:.1f} s" + (f"; one rank of FSDP2 over {fsdp} ranks" if fsdp else ""))
    return prof, desc


def _load_profile(args: argparse.Namespace) -> tuple[Profile, str]:
    prof: Profile = args.loaded_profile  # read and checked by _check_model_args
    return prof, f"profile {args.profile} ({len(prof.stages)} stages, {prof.device})"


def _add_optimizer(prof: Profile, optimizer: str) -> Profile:
    """The profile with ``optimizer``'s state as fixed memory and its step's temporaries after backward: as
    recorded when profiling (exact, per dtype), or, for a profile saved before that, from its gradients (one
    state tensor per gradient, same size) and one copy of the parameters."""
    if optimizer == "none":
        return prof
    recorded = prof.meta.get("optimizer_state_bytes") or {}
    if optimizer in recorded:
        extra = int(recorded[optimizer])
    else:
        copies = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}[optimizer]
        extra = copies * (prof.grads_bytes or prof.params_bytes)
    # The step's temporaries as recorded, else one copy of the parameters (a multi-tensor update's, at most).
    step = (prof.meta.get("optimizer_step_bytes") or {}).get(optimizer, prof.params_bytes if extra else 0)
    prof = prof.with_extra_fixed(extra, f"{optimizer} state") if extra else prof
    return dataclasses.replace(prof, after_backward_bytes=int(step))


def _print_report(prof: Profile, desc: str, plan: Any) -> None:
    none = solve(prof, None, strategy="none")
    every = solve(prof, None, strategy="every")
    _print(desc)
    _print(f"fixed memory: {prof.fixed_summary()}")
    least = min_feasible_plan(prof) if prof.head_options else None
    chunks = f" (head in {least.head_chunks} chunks)" if least is not None and least.head_chunks else ""
    _print(f"peak without checkpointing {format_bytes(none.peak_bytes)}; every block checkpointed"
           f" {format_bytes(every.peak_bytes)} (+{100 * every.prediction.overhead:.1f}% time); smallest feasible"
           f" {format_bytes(min_feasible_peak(prof))}{chunks}")
    _print("")
    _print(str(plan))
    fits = "fits" if plan.peak_bytes <= (plan.budget_bytes or plan.peak_bytes) else "does not fit"
    _print(f"\nverdict: one training step {fits} in {format_bytes(plan.budget_bytes or 0)}: predicted peak"
           f" {format_bytes(plan.peak_bytes)}, step time +{100 * plan.prediction.overhead:.1f}% over no checkpointing")


def _print_frontier(prof: Profile) -> None:
    from remat.planning.table import render_table

    rows = [[format_bytes(p.peak_bytes), format_seconds(p.time_s), f"+{100 * p.prediction.overhead:.1f}%",
             sum(1 for _ in p.regions()), max(p.prediction.forwards) - 1] for p in frontier(prof)]
    _print("\n" + render_table(["peak", "step", "recompute", "regions", "max recomputations"], rows,
                               title="the memory-time frontier (optimal plans, smallest peak first):"))


def cmd_plan(args: argparse.Namespace) -> int:
    """``remat plan``: profile (or load) -> solve -> report; ``--json`` for programs."""
    _check_plan_args(args)
    prof, desc = _load_profile(args) if args.profile else _profile_model(args, quiet=args.json)
    prof = _add_optimizer(prof, args.optimizer)
    plan = solve(prof, args.budget, strategy=args.strategy)
    if args.json:
        _print(plan.to_json())
    else:
        _print_report(prof, desc, plan)
        if args.frontier:
            _print_frontier(prof)
    if args.plot:
        from remat.app.plot import plot_frontier

        plot_frontier(prof, args.plot, highlight=plan)
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """``remat profile MODEL -o FILE``."""
    _check_model_args(args)
    _check_output(args.output, "-o")
    _check_user_model(args)
    prof, desc = _profile_model(args, quiet=False)
    with open(args.output, "w") as f:
        f.write(prof.to_json())
    _print(desc)
    _print(str(prof))
    _print(f"wrote {args.output}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``remat demo``: see :mod:`remat.app.demo`."""
    _check_output(args.plot, "--plot", png=True)
    from remat.app.demo import cmd_demo as run

    return run(args)


# ---- the parser ----------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse, but a mistake raises :class:`UsageError` (one line from :func:`main`) instead of exiting."""

    def error(self, message: str) -> NoReturn:
        where = f"{self.prog}: " if " " in self.prog else ""  # name the subcommand
        raise UsageError(f"{where}{message} (see {self.prog} --help)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("remat")
    except PackageNotFoundError:  # pragma: no cover - run from a source tree that is not installed
        return "(not installed)"


def _epilog() -> str:
    models = "\n".join(f"  {name:<12} {spec.description}" for name, spec in MODELS.items())
    defaults = ", ".join(f"--{k} {v}" for k, v in MODEL_DEFAULTS.items())
    return (
        "budgets (--budget): the peak memory of one training step, fixed memory (parameters, gradients,\n"
        "  optimizer state) included: a size like 80GiB, 6GB, 750MiB (GiB = 2^30 bytes, GB = 10^9) or a byte\n"
        "  count; or a share of the predicted peak without checkpointing: 50% or 0.5.\n"
        f"strategies (--strategy, default optimal): {', '.join(strategies())}\n"
        f"models (random or meta weights, never downloaded; defaults {defaults}):\n{models}\n"
        f"{USER_MODELS}"
        "examples:\n"
        "  remat plan llama-7b --batch 8 --seq 4096 --dtype bfloat16 --budget 80GiB --optimizer adamw\n"
        "  remat profile gpt2-tiny --device cpu -o profile.json && remat plan --profile profile.json --budget 50%\n"
        "  remat plan my_model.py:build --batch 4 --seq 2048 --dtype bfloat16 --budget 24GiB\n"
        "  remat plan path/to/config.json --seq 4096 --dtype bfloat16 --budget 80GiB\n"
        "  remat demo"
    )


def _debug_arg(q: argparse.ArgumentParser) -> None:
    q.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")


def _model_args(q: argparse.ArgumentParser) -> None:
    d = MODEL_DEFAULTS
    q.add_argument("model", nargs="?", help=f"a built-in model ({', '.join(MODELS)}); or your own:"
                                           " FILE.py:FUNCTION, module:FUNCTION or a transformers config.json"
                                           " (see below)")
    q.add_argument("--batch", type=_positive("--batch"), help=f"batch size (default {d['batch']})")
    q.add_argument("--seq", type=_positive("--seq"),
                   help=f"sequence length, at most the model's positions (default {d['seq']})")
    q.add_argument("--dtype", choices=list(DTYPE_BYTES), help=f"parameters and activations (default {d['dtype']})")
    q.add_argument("--device", help=f"meta (nothing allocated, times estimated), cpu, cuda or cuda:N"
                                    f" (default {d['device']})")
    q.add_argument("--throughput", choices=THROUGHPUT_NAMES,
                   help=f"the device whose speed estimates times on meta (default {d['throughput']})")
    q.add_argument("--repeats", type=_positive("--repeats"),
                   help=f"timed runs per measurement on cpu or cuda (default {d['repeats']})")
    q.add_argument("--head", choices=HEAD_NAMES,
                   help="the loss head: keep it as the model has it, or let the planner run the output projection"
                        " and the loss in chunks of tokens, each recomputed in backward (a transformers causal LM;"
                        f" the planned model then returns its loss and no logits) (default {d['head']})")


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = _Parser(prog="remat", formatter_class=fmt, epilog=_epilog(),
                description="Fit PyTorch training into a memory budget by activation checkpointing, at the least"
                            " extra time.")
    p.add_argument("--version", action="version", version=f"remat {_version()}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="{demo,plan,profile}")

    d = sub.add_parser("demo", help="the main job: no checkpointing, sqrt(N), every layer and remat, measured")
    _debug_arg(d)
    d.add_argument("--quick", action="store_true", help="tiny sizes (for tests)")
    d.add_argument("--plot", default="remat-frontier.png", help="where to write the frontier PNG (default %(default)s)")
    d.set_defaults(func=cmd_demo)

    q = sub.add_parser("plan", help="plan one training step of a built-in model or a saved profile",
                       formatter_class=fmt, epilog=_epilog())
    _debug_arg(q)
    _model_args(q)
    q.add_argument("--profile", help="a profile.json from `remat profile`, instead of a model and its options")
    q.add_argument("--budget", required=True, help=BUDGET_HELP)
    q.add_argument("--strategy", default="optimal", help="how to plan (default %(default)s; see below)")
    q.add_argument("--optimizer", default="none", choices=OPTIMIZER_NAMES,
                   help="count this optimizer's state as fixed memory, in the parameters' dtype, with torch's"
                        " defaults (adam, adamw: 2 copies of the parameters; sgd-momentum: 1; sgd: none)"
                        " (default %(default)s)")
    q.add_argument("--fsdp", type=_positive("--fsdp"), metavar="N",
                   help="plan one rank of FSDP2 over N ranks (fully_shard per block and the root): the budget"
                        " is per rank, parameters, gradients and optimizer state are sharded")
    q.add_argument("--json", action="store_true", help="print only the plan, as JSON")
    q.add_argument("--plot", help="also write the memory-time frontier to this PNG")
    q.add_argument("--frontier", action="store_true", help="also print the memory-time frontier")
    q.set_defaults(func=cmd_plan)

    r = sub.add_parser("profile", help="profile a built-in model and save the profile as JSON",
                       formatter_class=fmt, epilog=_epilog())
    _debug_arg(r)
    _model_args(r)
    r.add_argument("-o", "--output", required=True, help="where to write the profile (JSON)")
    r.set_defaults(func=cmd_profile)
    return p


# ---- entry point -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``remat`` command; returns the exit status (2 for a mistake, with one line on stderr)."""
    args = None
    try:
        args = _parser().parse_args(argv)
        return int(args.func(args))
    except SystemExit as e:  # --help, --version
        return e.code if isinstance(e.code, int) else 0
    except BrokenPipeError:  # `remat plan ... | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (RematError, OSError) as e:
        if args is not None and args.debug:
            raise
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"remat: error: {msg.removeprefix('remat: ')}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
