"""Plan files: every corruption of a saved plan is a PlanError naming the item or the key.

The files are written by hand here, as a person editing one would, not produced by Plan.to_json.
"""

import json

import pytest

from remat import Plan, PlanError, Prediction, Record, Region

# A valid plan for a chain of 6 stages: the prologue, four blocks, the head.
GOOD = """{
 "format": "remat.Plan/1",
 "strategy": "optimal",
 "budget_bytes": 1000,
 "fingerprint": "",
 "options": {},
 "input_shapes": [[[8, 64], "torch.float32"]],
 "stage_names": ["<prologue>", "h.0", "h.1", "h.2", "h.3", "<head>"],
 "stage_kinds": ["prologue", "block", "block", "block", "block", "head"],
 "items": [
  {"op": "record", "stage": 0},
  {"op": "region", "start": 1, "stop": 4, "body": [
   {"op": "region", "start": 1, "stop": 3, "body": [{"op": "record", "stage": 1}, {"op": "record", "stage": 2}]},
   {"op": "record", "stage": 3}]},
  {"op": "record", "stage": 4},
  {"op": "record", "stage": 5}
 ],
 "prediction": {"peak_bytes": 900, "fwd_s": 1.0, "bwd_s": 2.0, "recompute_s": 0.5,
                "forwards": [1, 3, 3, 2, 1, 1], "held_bytes": [1, 2, 3, 4, 5, 0], "fixed_bytes": 100}
}"""


def edited(**changes):
    """GOOD with top-level keys replaced (a value of ... deletes the key)."""
    d = json.loads(GOOD)
    for key, value in changes.items():
        if value is ...:
            del d[key]
        else:
            d[key] = value
    return json.dumps(d)


def items(*its):
    return edited(items=list(its))


R = {"op": "record", "stage": 0}


def rec(k):
    return {"op": "record", "stage": k}


def region(a, b, body=None):
    return {"op": "region", "start": a, "stop": b, "body": body if body is not None else [rec(k) for k in range(a, b)]}


def test_the_good_file_loads():
    plan = Plan.from_json(GOOD)
    assert plan.items[1] == Region(1, 4, (Region(1, 3, (Record(1), Record(2))), Record(3)))
    assert plan.input_shapes == (((8, 64), "torch.float32"),)
    assert plan.block_indices() == (1, 2, 3, 4)
    assert Plan.from_json(plan.to_json()) == plan


def test_a_plan_without_kinds_infers_them_from_the_names():
    plan = Plan.from_json(edited(stage_kinds=...))
    assert plan.stage_kinds == ("prologue", "block", "block", "block", "block", "head")


CASES = [
    # overlapping and out-of-range regions
    ("overlap", items(R, region(1, 3), region(2, 5), rec(5)),
     r"plan item 2 \(region 2..4\) overlaps region 1..2"),
    ("overlap after a record", items(R, rec(1), region(1, 3), rec(3), rec(4), rec(5)),
     r"plan item 2 \(region 1..2\) overlaps record 1"),
    ("region past the end", items(R, region(1, 7)),
     r"plan item 1 \(region 1..6\) is outside the plan's stages 0..5"),
    ("record past the end", items(R, rec(1), rec(2), rec(3), rec(4), rec(5), rec(6)),
     r"plan item 6 \(record 6\) is outside the plan's stages 0..5"),
    ("negative stage", items({"op": "record", "stage": -1}),
     r"plan item 0: stage=-1 must be >= 0"),
    ("a region over the head", items(R, region(1, 6)),
     r"plan item 1 \(region 1..5\) contains stage 5, which cannot be checkpointed"),
    ("a region over the prologue", items(region(0, 2), rec(2), rec(3), rec(4), rec(5)),
     r"plan item 0 \(region 0..1\) contains stage 0, which cannot be checkpointed"),
    ("a backwards region", items(R, region(3, 1, []), rec(1)),
     r"plan item 1 \(region 3..0\) starts at stage 3: stages 1..2 missing"),
    ("an empty region", items(R, region(1, 1, []), rec(1)),
     r"plan item 1 \(region 1..0\) is empty: stop 1 <= start 1"),
    # bodies
    ("a body naming a stage outside its region",
     items(R, region(1, 3, [rec(1), rec(2), rec(3)]), rec(3), rec(4), rec(5)),
     r"plan item 1 \(region 1..2\), body item 2 \(record 3\) is outside its region's stages 1..2"),
    ("a nested body outside", items(R, region(1, 4, [region(1, 3, [rec(1), rec(4)]), rec(3)]), rec(4), rec(5)),
     r"plan item 1 \(region 1..3\), body item 0 \(region 1..2\), body item 1 \(record 4\) is outside"),
    ("an empty body", items(R, region(1, 3, []), rec(3), rec(4), rec(5)),
     r"plan item 1 \(region 1..2\) has an empty body"),
    ("a body that misses a stage", items(R, region(1, 3, [rec(1)]), rec(3), rec(4), rec(5)),
     r"plan item 1 \(region 1..2\), body: items end at stage 1; stage 2 missing"),
    # missing stages
    ("a gap", items(R, rec(1), rec(3), rec(4), rec(5)),
     r"plan item 2 \(record 3\) starts at stage 3: stage 2 missing"),
    ("a short plan", items(R, rec(1), rec(2)),
     r"from_json: items end at stage 2; stages 3..5 missing"),
    ("no items", items(), r"from_json: no items for stages 0..5"),
    # unknown keys, wrong types, missing keys
    ("an unknown item key", items({"op": "record", "stage": 0, "keep": True}),
     r"plan item 0: unknown key 'keep'; expected 'op', 'stage'"),
    ("an unknown operation", items({"op": "offload", "stage": 0}),
     r"plan item 0: unknown operation 'offload'; expected 'record' or 'region'"),
    ("an item missing its stage", items({"op": "record"}), r"plan item 0: missing key 'stage'"),
    ("a region missing its body", items(R, {"op": "region", "start": 1, "stop": 3}),
     r"plan item 1: missing key 'body'"),
    ("a stage as a string", items({"op": "record", "stage": "0"}), r"plan item 0: stage='0' must be an int"),
    ("a stage as a float", items({"op": "record", "stage": 0.0}), r"plan item 0: stage=0.0 must be an int"),
    ("a stage as a bool", items({"op": "record", "stage": True}), r"plan item 0: stage=True must be an int"),
    ("a body that is not a list", items(R, {"op": "region", "start": 1, "stop": 3, "body": {}}),
     r"plan item 1: body=\{\} must be a list"),
    ("an item that is not an object", items(0), r"plan item 0: expected an object"),
    ("items not a list", edited(items={"op": "record"}), r"items=.* must be a list"),
    ("an unknown plan key", edited(schedule=[]), r"from_json: unknown key 'schedule'"),
    ("a missing plan key", edited(stage_names=...), r"from_json: missing key 'stage_names'"),
    ("a missing prediction", edited(prediction=...), r"from_json: missing key 'prediction'"),
    ("a prediction key missing", edited(prediction={"peak_bytes": 1}), r"prediction: missing key 'fwd_s'"),
    ("a prediction of the wrong type",
     edited(prediction={**json.loads(GOOD)["prediction"], "forwards": "1,1"}),
     r"prediction.forwards='1,1' must be a list"),
    ("a prediction for other stages",
     edited(prediction={**json.loads(GOOD)["prediction"], "forwards": [1, 1]}),
     r"from_json: prediction.forwards has 2 entries for 6 stages"),
    ("a budget as a string", edited(budget_bytes="1GiB"), r"budget_bytes='1GiB' must be an int"),
    ("a negative budget", edited(budget_bytes=-1), r"budget_bytes=-1 must be >= 0"),
    ("a name that is not a string", edited(stage_names=["<prologue>", 1, "h.1", "h.2", "h.3", "<head>"]),
     r"stage_names\[1\]=1 must be a str"),
    ("kinds for other stages", edited(stage_kinds=["block"]), r"from_json: stage_kinds has 1 entries for 6 stages"),
    ("an unknown kind", edited(stage_kinds=["prologue", "block", "layer", "block", "block", "head"]),
     r"from_json: stage 2 \(h.1\) has kind 'layer'; expected one of"),
    ("options not an object", edited(options=[1]), r"options=\[1\] must be an object"),
    ("strategy not a string", edited(strategy=3), r"strategy=3 must be a string"),
    ("another format", edited(format="remat.Plan/2"), r"unknown format 'remat.Plan/2'; expected 'remat.Plan/1'"),
    ("not a plan at all", "[1, 2]", r"expected a JSON object, got list"),
    ("not JSON", "{'format': ", r"invalid JSON"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_corrupted_plan_is_a_plan_error_naming_the_item(text, message):
    with pytest.raises(PlanError, match=r"^Plan\.from_json: ") as e:
        Plan.from_json(text)
    assert e.type is PlanError
    assert e.match(message)


def test_validate_checks_a_plan_built_by_hand():
    plan = Plan.from_json(GOOD)
    bad = Plan(items=(Record(0), Record(2)), strategy="x", budget_bytes=None, prediction=plan.prediction,
               stage_names=plan.stage_names)
    with pytest.raises(PlanError, match=r"plan item 1 \(record 2\) starts at stage 2: stage 1 missing"):
        bad.validate()
    none = Prediction(0, 0.0, 0.0, 0.0, (), (), 0)
    odd = Plan(items=(Record("0"),), strategy="x", budget_bytes=None, prediction=none, stage_names=("a",))
    with pytest.raises(PlanError, match=r"plan item 0: stage='0' must be an int"):
        odd.validate()
    with pytest.raises(PlanError, match=r"plan item 0: 3 is not a remat.Record or remat.Region"):
        Plan(items=(3,), strategy="x", budget_bytes=None, prediction=none, stage_names=("a",)).validate()
    with pytest.raises(PlanError, match=r"plan item 0 \(record -1\) is outside the plan's stage 0"):
        Plan(items=(Record(-1),), strategy="x", budget_bytes=None, prediction=none, stage_names=("a",)).validate()


def test_a_measured_profile_in_the_old_format_is_refused_with_the_fix():
    """Format 1 lacked the BatchNorm copies and the options' backward extras, and its options could save a
    block's output: a measured profile in it could plan over its budget."""
    import json

    from remat import Profile, ProfileError

    p = Profile.from_lists([10, 10, 10], [30, 30, 0], [1.0] * 3, [2.0] * 3)
    d = json.loads(p.to_json())
    assert d["format"] == "remat.Profile/2"
    d["format"] = "remat.Profile/1"
    assert Profile.from_dict(d) == p  # built by hand: nothing measured, still read
    d["device"] = "cpu"
    with pytest.raises(ProfileError, match=r"Profile/1.*profile the model again"):
        Profile.from_dict(d)
