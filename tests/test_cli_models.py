"""The user's own model on the command line: ``remat plan FILE.py:FUNCTION``, ``module:FUNCTION``, a transformers
config.json; every bad one refused in one line, exit status 2, before profiling."""

import json
import sys

import pytest

import remat
import remat.runtime.profiler
from remat.app import cli

from .test_cli import refused, run_without_torch

MODELS_PY = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.relu(self.fc1(x)))


def build(batch, seq, dtype, device):
    assert torch.empty(0).device.type == torch.device(device).type  # called under torch.device(device)
    model = nn.Sequential(*[Block(32) for _ in range(4)]).to(dtype)
    return model, torch.randn(batch, seq, 32, dtype=dtype)


def fixed():
    return nn.Sequential(*[Block(16) for _ in range(3)]), torch.randn(2, 4, 16)


def with_loss(**kwargs):
    model, x = build(kwargs["batch"], kwargs["seq"], kwargs["dtype"], kwargs["device"])
    return model, (x,), lambda out: out.pow(2).mean()


def language_model(seq):
    import transformers

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=128,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def text():
    return "a model"


def model_second():
    return torch.randn(2), nn.Linear(2, 2)


def three_things():
    return nn.Linear(2, 2), torch.randn(2), 3


def no_tensors():
    return nn.Linear(2, 2), {"x": 1}


def bare_module():
    return nn.Linear(2, 2)


def raises(batch):
    raise ValueError("the data set is not mounted")


def needs(path, batch):
    pass
'''

LLAMA_CONFIG = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                "max_position_embeddings": 256}

PLAN = ["--budget", "0.97", "--device", "cpu", "--repeats", "1"]


@pytest.fixture
def models_py(tmp_path):
    path = tmp_path / "my_models.py"
    path.write_text(MODELS_PY)
    yield path
    sys.modules.pop("my_models", None)


@pytest.fixture
def no_profiling(monkeypatch):
    """Profiling fails the test: the command must refuse before."""
    def boom(*args, **kwargs):
        raise AssertionError("the command started profiling before checking its arguments")

    monkeypatch.setattr(remat.runtime.profiler, "profile", boom)


# ---- FILE.py:FUNCTION and module:FUNCTION -----------------------------------------------------------------


def test_plan_a_function_in_a_file_given_batch_seq_and_dtype(capsys, models_py):
    assert cli.main(["plan", f"{models_py}:build", "--batch", "2", "--seq", "8", "--dtype", "bfloat16", *PLAN]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{models_py}:build: Sequential, 33,408 parameters; inputs 2x8x32 bfloat16; parameters"
                          " bfloat16; profiled on cpu")
    assert "predicted peak" in out and "verdict: one training step fits" in out


def test_plan_a_module_function_from_the_current_directory_with_a_loss(capsys, models_py, monkeypatch):
    monkeypatch.chdir(models_py.parent)
    assert cli.main(["plan", "my_models:with_loss", "--batch", "2", "--seq", "4", *PLAN]) == 0
    assert "my_models:with_loss: Sequential" in capsys.readouterr().out


def test_a_function_that_makes_its_own_inputs_and_dtype_cast(capsys, models_py):
    assert cli.main(["plan", f"{models_py}:fixed", "--dtype", "bfloat16", *PLAN]) == 0
    assert "inputs 2x4x16 bfloat16; parameters bfloat16" in capsys.readouterr().out
    err = refused(capsys, "plan", f"{models_py}:fixed", "--batch", "4", "--seq", "9", *PLAN)
    assert "returns its own inputs and has no batch or seq parameter: --batch, --seq would be ignored" in err


def test_a_bare_language_model_is_fed_token_ids_within_its_positions(capsys, models_py, no_profiling):
    err = refused(capsys, "plan", f"{models_py}:language_model", "--seq", "200", *PLAN)
    assert f"--seq 200 is past {models_py}:language_model's 128 positions (its config's n_positions)" in err


def test_plan_a_bare_language_model(capsys, models_py):
    assert cli.main(["plan", f"{models_py}:language_model", "--batch", "2", "--seq", "16", *PLAN]) == 0
    assert "GPT2LMHeadModel" in capsys.readouterr().out


def test_profile_a_function_then_plan_the_saved_profile(capsys, models_py, tmp_path):
    saved = tmp_path / "p.json"
    assert cli.main(["profile", f"{models_py}:build", "--batch", "2", "--seq", "4", "--device", "cpu",
                     "--repeats", "1", "-o", str(saved)]) == 0
    assert cli.main(["plan", "--profile", str(saved), "--budget", "0.97"]) == 0
    assert "verdict:" in capsys.readouterr().out


@pytest.mark.parametrize(("function", "message"), [
    ("text", "returned a str; return the model, (model, inputs) or (model, inputs, loss_fn)"),
    ("model_second", "returned a Tensor where the model goes (first)"),
    ("three_things", "returned a int as loss_fn"),
    ("no_tensors", "returned inputs without a tensor (dict)"),
    ("bare_module", "returned a Linear without inputs, and remat makes inputs only for transformers language"
                    " models"),
    ("raises", "raised ValueError: the data set is not mounted (--debug shows the traceback)"),
])
def test_a_function_returning_the_wrong_thing_is_one_line(capsys, models_py, no_profiling, function, message):
    err = refused(capsys, "plan", f"{models_py}:{function}", *PLAN)
    assert f"remat: error: {models_py}:{function} {message}" in err


@pytest.mark.parametrize(("model", "message"), [
    ("{py}:needs", "{py}:needs: the function needs path, which remat cannot give"),
    ("{py}:missing", "{py}:missing: {py} has no 'missing'; it defines Block, bare_module, build, fixed"),
    ("{py}:Block.nope", "has no 'Block.nope'"),
    ("{py}", "{py}: name the function that builds the model: {py}:FUNCTION"),
    ("{py}:", "after the colon, name the function that builds the model"),
    ("{dir}/absent.py:build", "{dir}/absent.py: no such file"),
    ("no_such_package.models:build", "no module named 'no_such_package'"),
    ("{dir}:build", "{dir}: is a directory"),
])
def test_a_bad_model_function_is_one_line(capsys, models_py, no_profiling, model, message):
    fill = dict(py=models_py, dir=models_py.parent)
    err = refused(capsys, "plan", model.format(**fill), *PLAN)
    assert message.format(**fill) in err


def test_a_function_is_imported_only_after_the_cheap_checks(capsys, models_py, no_profiling):
    models_py.write_text("raise AssertionError('imported')\n")
    assert "--strategy 'fastest': unknown" in refused(capsys, "plan", f"{models_py}:f", "--strategy", "fastest",
                                                      *PLAN)


def test_a_file_that_fails_or_exits_when_imported_is_one_line(capsys, tmp_path, no_profiling):
    script = tmp_path / "train.py"
    script.write_text("import argparse, sys\nargparse.ArgumentParser().parse_args()\nsys.exit(3)\n")
    err = refused(capsys, "plan", f"{script}:build", *PLAN)  # its argparse saw no arguments, not remat's
    assert f"importing {script} failed: SystemExit: 3 (does it run a script when imported?" in err
    script.write_text("import no_such_module_here\n")
    err = refused(capsys, "plan", f"{script}:build", *PLAN)
    assert "failed: ModuleNotFoundError: No module named 'no_such_module_here'" in err


def test_a_file_path_said_without_function_no_longer_says_unknown_model(capsys, no_profiling):
    err = refused(capsys, "plan", "./my_model.py", "--budget", "1GiB")
    assert "unknown model" not in err and "./my_model.py:FUNCTION" in err
    err = refused(capsys, "plan", "gpt5", "--budget", "1GiB")
    assert "unknown model 'gpt5'" in err and "FILE.py:FUNCTION, module:FUNCTION or a transformers config.json" in err


# ---- a transformers config.json ----------------------------------------------------------------------------


def test_plan_a_config_json_and_its_directory(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    for where in (tmp_path / "config.json", tmp_path):
        assert cli.main(["plan", str(where), "--batch", "2", "--seq", "16", *PLAN]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"{where}: a llama config: 2 layers, hidden 64, vocab 128; batch 2 x seq 16, float32")


def test_a_config_on_meta_allocates_nothing(capsys, tmp_path, monkeypatch):
    from remat.app import zoo

    (tmp_path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    user = zoo.user_model(str(tmp_path), batch=2, seq=16, dtype="bfloat16")
    built = user.build(batch=2, seq=16, dtype="bfloat16", device="meta", given={"dtype"})
    assert {p.device.type for p in built.model.parameters()} == {"meta"}
    assert {str(p.dtype) for p in built.model.parameters()} == {"torch.bfloat16"}
    assert built.inputs["input_ids"].shape == (2, 16) and built.inputs["use_cache"] is False


@pytest.mark.parametrize(("config", "message"), [
    ({**LLAMA_CONFIG}, "--seq 300 is past {path}'s 256 positions (its config's max_position_embeddings)"),
    ({"hidden_size": 8}, "{path}: no 'model_type', not a transformers config"),
    ({"model_type": "t5", "d_model": 8, "vocab_size": 10}, "transformers has no causal language model for a t5"),
    ({"model_type": "no-such-type", "hidden_size": 8, "vocab_size": 10}, "model_type 'no-such-type' is not one"),
    ({"model_type": "clip", "projection_dim": 8}, "a clip config without vocab_size"),
    ("not json", "{path}: not JSON"),
])
def test_a_bad_config_is_one_line(capsys, tmp_path, no_profiling, config, message):
    path = tmp_path / "config.json"
    path.write_text(config if isinstance(config, str) else json.dumps(config))
    err = refused(capsys, "plan", str(path), "--seq", "300", *PLAN)
    assert message.format(path=path) in err


def test_a_saved_profile_given_as_the_model_says_to_use_profile(capsys, tmp_path, no_profiling):
    saved = tmp_path / "p.json"
    saved.write_text(remat.Profile.from_lists([1, 1], [1, 0], [1.0, 1.0], [1.0, 1.0]).to_json())
    err = refused(capsys, "plan", str(saved), "--budget", "1GiB")
    assert f"{saved}: a profile saved by `remat profile`, not a model; plan it with --profile {saved}" in err


def test_a_directory_without_config_is_one_line(capsys, tmp_path, no_profiling):
    err = refused(capsys, "plan", str(tmp_path), *PLAN)
    assert f"{tmp_path}: no config.json in this directory" in err
    err = refused(capsys, "profile", str(tmp_path / "absent.json"), "-o", str(tmp_path / "p.json"))
    assert f"{tmp_path / 'absent.json'}: no such file" in err


# ---- documented -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "profile"])
def test_the_help_says_how_to_give_your_own_model(command):
    r = run_without_torch(command, "--help")
    text = " ".join(r.stdout.split())
    assert r.returncode == 0 and "FILE.py:FUNCTION" in text and "module:FUNCTION" in text
    assert "(model, inputs, loss_fn)" in text and "AutoModelForCausalLM.from_config" in text
    assert "with torch.device(device)" in text
