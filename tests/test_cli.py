"""The ``remat`` command: help without torch, every argument checked before any work, the demo, the examples."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import remat
import remat.runtime.profiler
from remat.app import catalog, cli, demo, zoo

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "remat", *args], capture_output=True, text=True, timeout=600)


def run_without_torch(*args):
    """``python -m remat ARGS`` where ``import torch`` fails."""
    code = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['remat', *sys.argv[1:]];"
            " runpy.run_module('remat', run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)


# ---- help and version: instant, no torch ------------------------------------------------------------------


def test_help_needs_no_torch_and_says_what_a_budget_is():
    r = run_without_torch("--help")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in catalog.MODELS:
        assert f"  {name} " in out, name
    assert remat.strategies() and all(s in out for s in remat.strategies())
    assert "80GiB" in out and "50%" in out and "peak without checkpointing" in out
    assert "--batch 8" in out and "--seq 1024" in out and "--device meta" in out


@pytest.mark.parametrize("command", ["plan", "profile", "demo"])
def test_subcommand_help_needs_no_torch_and_shows_defaults(command):
    r = run_without_torch(command, "--help")
    assert r.returncode == 0, r.stderr
    if command != "demo":
        text = " ".join(r.stdout.split())  # argparse wraps lines
        assert "batch size (default 8)" in text and "(default 1024)" in text and "(default meta)" in text
        assert "llama-7b" in text
    if command == "plan":
        assert "share of the peak without checkpointing" in " ".join(r.stdout.split())


def test_version_needs_no_torch():
    """The installed distribution's version (pyproject.toml's), as pip and importlib.metadata see it."""
    from importlib.metadata import version

    r = run_without_torch("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"remat {version('remat')}"


def test_the_help_lists_agree_with_the_library():
    from remat.runtime.optimizer import OPTIMIZERS
    from remat.runtime.profiler import THROUGHPUTS

    assert set(cli.THROUGHPUT_NAMES) == set(THROUGHPUTS)
    assert set(cli.OPTIMIZER_NAMES) == set(OPTIMIZERS)


# ---- every argument checked before any work: the filed bugs, one test each ---------------------------------


@pytest.fixture
def no_work(monkeypatch):
    """Building or profiling a model fails the test: the command must refuse before."""
    def boom(*args, **kwargs):
        raise AssertionError("the command started working before checking its arguments")

    monkeypatch.setattr(zoo, "build", boom)
    monkeypatch.setattr(remat.runtime.profiler, "profile", boom)


def refused(capsys, *argv):
    """Run ``remat ARGV`` in-process: exit 2, one line on stderr, nothing on stdout; returns the line."""
    assert cli.main(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("remat: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(capsys, no_work):
    err = refused(capsys, "plan", "gpt2", "--device", "cuda", "--budget", "80GiB")
    assert "--device cuda: this machine has no CUDA device" in err and "--device meta" in err


@pytest.mark.parametrize("device", ["tpu", "cpu:1", "cuda:x", "mps"])
def test_device_that_remat_does_not_run_on(capsys, no_work, device):
    err = refused(capsys, "plan", "gpt2", "--device", device, "--budget", "80GiB")
    assert f"--device {device}: not a device remat runs on" in err


def test_a_tensor_larger_than_pytorch_can_hold_is_refused_with_the_figure(capsys, no_work):
    err = refused(capsys, "plan", "llama-7b", "--seq", "1000000000", "--budget", "80GiB")
    assert "the attention mask would be 8 x 1000000000 x 1000000000 = 8e+18 elements, 3.2e+19 bytes" in err
    assert "past the largest tensor PyTorch can hold" in err
    err = refused(capsys, "profile", "mlp", "--batch", "1000000000", "--seq", "1000000000", "-o", "p.json")
    assert "the input would be 1000000000000000000 x 1024" in err


@pytest.mark.parametrize("path", ["f.txt", "fnoext", "frontier.PNG.pdf"])
def test_plot_must_be_a_png(capsys, no_work, path):
    err = refused(capsys, "plan", "gpt2", "--plot", path, "--budget", "80GiB")
    assert f"--plot {path}: the frontier is written as a PNG image; give a path ending in .png" in err
    refused(capsys, "demo", "--plot", path)


@pytest.mark.parametrize("name", [n for n, m in catalog.MODELS.items() if m.max_positions])
def test_sequence_past_the_models_positions(capsys, no_work, name):
    limit = catalog.MODELS[name].max_positions
    err = refused(capsys, "plan", name, "--seq", str(limit + 1), "--budget", "80GiB")
    assert f"--seq {limit + 1} is past {name}'s {limit} positions" in err
    assert catalog.check_request(name, batch=1, seq=limit).name == name


@pytest.mark.parametrize("name", [n for n, m in catalog.MODELS.items() if m.max_positions])
def test_the_catalogs_positions_are_the_configs(name):
    import transformers

    spec = catalog.MODELS[name]
    config = getattr(transformers, spec.classes[0])(**spec.config)
    assert config.max_position_embeddings == spec.max_positions  # GPT-2 maps it to n_positions


#: The published configs of the models the built-ins are named after (the Hugging Face hub's config.json of
#: gpt2, gpt2-medium, meta-llama/Llama-2-7b-hf, meta-llama/Llama-2-13b-hf, meta-llama/Meta-Llama-3-8B,
#: bert-base-uncased).
REAL_CONFIGS = {
    "gpt2": dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024),
    "gpt2-medium": dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024),
    "llama-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
    "llama-13b": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                      num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192),
    "bert-base": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                      vocab_size=30522, max_position_embeddings=512),
}


@pytest.mark.parametrize("name", sorted(REAL_CONFIGS))
def test_the_built_ins_named_after_real_models_have_their_real_configs(name):
    import transformers

    spec = catalog.MODELS[name]
    config = getattr(transformers, spec.classes[0])(**spec.config)
    for key, value in REAL_CONFIGS[name].items():
        assert getattr(config, key) == value, (name, key)
    assert spec.max_positions == config.max_position_embeddings
    assert (spec.layers, spec.hidden, spec.heads, spec.vocab) == (
        config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.vocab_size)


@pytest.mark.parametrize(("name", "seq", "limit"), [("gpt2", 2048, 1024), ("gpt2-medium", 1025, 1024),
                                                    ("bert-base", 1024, 512), ("gpt2-tiny", 2048, 1024)])
def test_gpt2_and_bert_refuse_sequences_past_their_real_positions(capsys, no_work, name, seq, limit):
    err = refused(capsys, "plan", name, "--seq", str(seq), "--budget", "80GiB")
    assert f"--seq {seq} is past {name}'s {limit} positions" in err and f"use --seq {limit} or less" in err


def test_zoo_build_refuses_what_the_cli_refuses():
    with pytest.raises(remat.RematError, match="past gpt2-tiny's 1024 positions"):
        zoo.build("gpt2-tiny", batch=1, seq=2048, device="meta")


def test_json_with_frontier_is_refused(capsys, no_work):
    err = refused(capsys, "plan", "gpt2", "--json", "--frontier", "--budget", "80GiB")
    assert "--json prints only the plan" in err


def test_model_options_with_a_saved_profile_are_refused(capsys, no_work, tmp_path):
    saved = tmp_path / "p.json"
    saved.write_text("{}")
    err = refused(capsys, "plan", "gpt2", "--profile", str(saved), "--budget", "80GiB")
    assert "model 'gpt2' would be ignored: drop it, or drop --profile" in err
    err = refused(capsys, "plan", "--profile", str(saved), "--batch", "4", "--seq", "64", "--budget", "80GiB")
    assert "--batch, --seq would be ignored: drop them" in err
    err = refused(capsys, "plan", "--profile", str(tmp_path / "missing.json"), "--budget", "80GiB")
    assert "missing.json: no such file" in err


@pytest.mark.parametrize("budget", ["lots", "-5GiB", "0%", "12 parsecs"])
def test_a_bad_budget_is_refused_before_profiling(capsys, no_work, budget):
    err = refused(capsys, "plan", "gpt2", f"--budget={budget}")
    assert repr(budget) in err


def test_an_unwritable_output_is_refused_before_profiling(capsys, no_work, tmp_path):
    err = refused(capsys, "profile", "gpt2", "-o", str(tmp_path / "missing" / "p.json"))
    assert "does not exist" in err
    err = refused(capsys, "profile", "gpt2", "-o", str(tmp_path))
    assert "is a directory" in err
    err = refused(capsys, "plan", "gpt2", "--budget", "80GiB", "--plot", str(tmp_path / "missing" / "f.png"))
    assert "does not exist" in err


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", b"\xff\xfe\x00binary",
                                     "é".encode("latin-1")])
def test_a_binary_file_as_profile_is_one_line_naming_it(capsys, no_work, tmp_path, content):
    bad = tmp_path / "f.png"
    bad.write_bytes(content)
    err = refused(capsys, "plan", "--profile", str(bad), "--budget", "80GiB")
    assert f"--profile {bad}: " in err and "not a profile" in err
    assert "expected a profile JSON written by `remat profile MODEL -o FILE`" in err


@pytest.mark.parametrize(("text", "what"), [
    ("[1, 2]", "a JSON list"),
    ('{"a": 1}', "a JSON object without 'stages' (its keys: a)"),
    ("not json", "not JSON"),
    ('{"stages": [{"x": 1}]}', "not a remat profile"),
    ('{"stages": 5}', "not a remat profile"),
    ('{"format": "remat.Plan/1", "stages": []}', "a plan (`remat plan --json` writes plans), not a profile"),
    ('{"format": "remat.Profile/9", "stages": []}', "unknown format 'remat.Profile/9'"),
])
def test_a_json_that_is_not_a_profile_is_one_line_naming_it(capsys, no_work, tmp_path, text, what):
    bad = tmp_path / "p.json"
    bad.write_text(text)
    err = refused(capsys, "plan", "--profile", str(bad), "--budget", "80GiB")
    assert f"--profile {bad}: {what}" in err and "expected" in err


def test_a_directory_as_profile_is_one_line(capsys, no_work, tmp_path):
    err = refused(capsys, "plan", "--profile", str(tmp_path), "--budget", "80GiB")
    assert f"--profile {tmp_path}: is a directory; expected a profile JSON" in err


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's sysfs, where no one may create files")
def test_an_output_the_system_refuses_is_found_before_profiling(capsys, no_work):
    """The tests run as root, whom os.access lets write anywhere; sysfs refuses to create files even so."""
    err = refused(capsys, "profile", "gpt2", "-o", "/sys/kernel/remat-profile.json")
    assert "-o /sys/kernel/remat-profile.json: cannot be written (Permission denied)" in err
    err = refused(capsys, "plan", "gpt2", "--budget", "80GiB", "--plot", "/sys/kernel/remat-frontier.png")
    assert "--plot /sys/kernel/remat-frontier.png: cannot be written (Permission denied)" in err


def test_an_output_under_a_file_is_found_before_profiling(capsys, no_work, tmp_path):
    (tmp_path / "f.png").write_bytes(b"")
    err = refused(capsys, "profile", "gpt2", "-o", str(tmp_path / "f.png" / "p.json"))
    assert f"-o {tmp_path / 'f.png' / 'p.json'}: {tmp_path / 'f.png'} is not a directory" in err


def test_checking_an_output_leaves_no_file_and_keeps_an_existing_one(tmp_path):
    cli._check_output(str(tmp_path / "new.json"), "-o")
    assert list(tmp_path.iterdir()) == []
    old = tmp_path / "old.json"
    old.write_text("kept")
    cli._check_output(str(old), "-o")
    assert old.read_text() == "kept"


@pytest.mark.parametrize("argv", [["plan", "gpt2", "--budget", "80GiB", "--plot", ""], ["demo", "--plot", ""],
                                  ["profile", "gpt2", "-o", ""], ["plan", "gpt2", "--budget", "80GiB", "--plot="]])
def test_an_empty_output_path_is_refused(capsys, no_work, argv):
    err = refused(capsys, *argv)
    assert "'': an empty path; give a file name" in err


@pytest.mark.parametrize("flag", ["--repeats", "--batch", "--seq"])
def test_zero_repeats_batch_or_seq_are_refused(capsys, no_work, flag):
    err = refused(capsys, "plan", "gpt2", flag, "0", "--budget", "80GiB")
    assert f"argument {flag}: must be 1 or more, got 0" in err


def test_other_mistakes_are_one_line_too(capsys, no_work):
    assert "unknown; use one of" in refused(capsys, "plan", "gpt2", "--strategy", "fastest", "--budget", "1GiB")
    assert "error: unknown model 'gpt5'" in refused(capsys, "plan", "gpt5", "--budget", "1GiB")  # one prefix
    assert "required: --budget" in refused(capsys, "plan", "gpt2")
    assert "name a model" in refused(capsys, "plan", "--budget", "1GiB")
    assert "invalid choice: 'frobnicate'" in refused(capsys, "frobnicate")


def test_errors_after_profiling_are_one_line_without_traceback():
    r = run_cli("plan", "gpt2", "--batch", "2", "--seq", "128", "--budget", "1KiB")
    assert r.returncode == 2
    assert r.stderr.startswith("remat: error: remat.solve: budget 1.00 KiB is below the smallest feasible peak")
    assert "Traceback" not in r.stderr and r.stderr.count("\n") == 1
    r = run_cli("plan", "mlp", "--budget", "lots", "--debug")
    assert r.returncode != 0 and "Traceback" in r.stderr


# ---- what the commands print and write ----------------------------------------------------------------------


def test_plan_prints_a_plan_and_json(capsys, tmp_path):
    assert cli.main(["plan", "gpt2", "--batch", "2", "--seq", "128", "--budget", "2GiB", "--device", "meta"]) == 0
    out = capsys.readouterr().out
    assert "predicted peak" in out and "fixed memory: " in out and "gradients" in out
    assert "verdict: one training step fits" in out
    png = tmp_path / "f.png"
    assert cli.main(["plan", "mlp", "--batch", "8", "--seq", "512", "--budget", "0.8", "--json",
                     "--plot", str(png)]) == 0
    out, err = capsys.readouterr()
    plan = remat.Plan.from_json(out)  # stdout is the plan only; --plot is honoured, and said on stderr
    assert plan.peak_bytes <= plan.budget_bytes
    assert err == f"wrote {png}\n" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_then_plan_from_the_saved_profile(tmp_path, capsys):
    out = tmp_path / "profile.json"
    png = tmp_path / "frontier.png"
    assert cli.main(["profile", "gpt2-tiny", "--batch", "2", "--seq", "64", "--device", "cpu", "--repeats", "1",
                     "-o", str(out)]) == 0
    assert json.loads(out.read_text())["format"] == "remat.Profile/2"
    assert cli.main(["plan", "--profile", str(out), "--budget", "0.9", "--optimizer", "adam",
                     "--plot", str(png), "--frontier"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {png}" in text and "the memory-time frontier" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("device", ["meta", "cpu"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_optimizer_state_is_counted_in_the_parameters_dtype(tmp_path, capsys, device, dtype):
    """AdamW on bf16 parameters keeps bf16 state: 4 bytes per parameter, not 8. On meta (planning for a
    GPU), Adam's step counters are left out: torch keeps them on the CPU."""
    from remat.runtime.optimizer import optimizer_state_bytes

    out = tmp_path / "p.json"
    assert cli.main(["profile", "llama-tiny", "--batch", "1", "--seq", "32", "--dtype", dtype, "--device", device,
                     "--repeats", "1", "-o", str(out)]) == 0
    prof = remat.Profile.from_json(out.read_text())
    state = prof.meta["optimizer_state_bytes"]
    model = zoo.build("llama-tiny", batch=1, seq=32, dtype=dtype, device=device).model
    tensors = len(list(model.parameters()))
    counters = 4 * tensors if device == "cpu" else 0
    assert state["adamw"] == state["adam"] == 2 * prof.params_bytes + counters
    assert state["sgd-momentum"] == prof.params_bytes and state["sgd"] == state["none"] == 0
    assert state["adamw"] == optimizer_state_bytes(model, "adamw", device=device)
    # The step's temporaries (Note [The optimizer's step]): on meta as a GPU's multi-tensor AdamW makes them.
    from remat.runtime.measure import optimizer_step_bytes

    steps = prof.meta["optimizer_step_bytes"]
    assert steps["adamw"] == optimizer_step_bytes(model, "adamw", foreach=True if device == "meta" else None) > 0
    assert steps["sgd"] == steps["none"] == 0
    capsys.readouterr()
    # A share near 1 is infeasible here: on one sequence of 32 tokens the optimizer's step, not the activations,
    # sets the peak (parameters, gradients, state and the step's temporaries at once).
    assert cli.main(["plan", "--profile", str(out), "--budget", "0.99", "--optimizer", "adamw"]) == 2
    assert "smallest feasible peak" in capsys.readouterr().err
    assert cli.main(["plan", "--profile", str(out), "--budget", "1GiB", "--optimizer", "adamw"]) == 0
    assert f"adamw state {remat.format_bytes(state['adamw'])}" in capsys.readouterr().out


# ---- the demo and the examples --------------------------------------------------------------------------------


def test_demo_prints_each_row_as_it_is_measured(tmp_path, monkeypatch):
    """Between measuring one way of running the step and the next, that one's row is printed; the headline
    sets remat against every-layer checkpointing at that peer's own measured peak, with the noise."""
    from remat.app import compare

    events = []
    real_print, real_check = demo._print, compare.check_variant

    def check(model, inputs, variant, **kwargs):
        events.append(("measure", variant.label))
        return real_check(model, inputs, variant, **kwargs)

    def record(*args, end="\n"):
        events.append(("print", " ".join(map(str, args))))
        real_print(*args, end=end)

    monkeypatch.setattr(compare, "check_variant", check)
    monkeypatch.setattr(demo, "_print", record)
    png = tmp_path / "f.png"
    assert cli.main(["demo", "--quick", "--plot", str(png)]) == 0
    text = "\n".join(t for kind, t in events if kind == "print")
    for label in ("no checkpointing", "√N segments", "every layer (transformers' own checkpointing)",
                  "remat optimal, budget = every layer's peak", "remat optimal, budget = √N's peak",
                  "remat optimal, least peak"):
        assert text.count(label) >= 2, label  # a memory row and a time row
    assert "grads equal" in text and " NO" not in text  # every gradient equal
    assert "timing the 6 ways interleaved" in text and "range over rounds" in text
    assert "-> at every layer's own peak" in text and "per-round ratios" in text
    assert "-> checkpointing every layer cuts the peak from" in text
    assert png.stat().st_size > 10_000
    measured = [k for k, (kind, _) in enumerate(events) if kind == "measure"]
    assert len(measured) == 6
    for a, b in zip(measured, measured[1:]):
        assert any(kind == "print" and t.endswith(("yes", "NO")) for kind, t in events[a:b]), events[a:b]


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.py")))
def test_examples_run(example):
    r = subprocess.run([sys.executable, str(ROOT / "examples" / example)], capture_output=True, text=True,
                       timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
