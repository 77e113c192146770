"""Config loading and validation: every error names the field by dotted path."""

from __future__ import annotations


import pytest
import yaml

from stream_rl.config import (
    Config,
    ConfigError,
    LearnerConfig,
    config_from_dict,
    config_to_dict,
    load_config,
)
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny.yaml"


def tiny_raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def error_of(raw, overrides=()) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(raw, overrides)
    return str(info.value)


# --- files that ship with the project -----------------------------------------

def test_tiny_yaml_loads_with_its_values():
    cfg = load_config(TINY)
    assert isinstance(cfg, Config)
    assert cfg.model.max_model_len == 512
    assert cfg.data.answer_regex is None
    assert (cfg.data.answer_field, cfg.data.answer_match) == ("solution", "exact")
    assert cfg.data.max_prompt_tokens == 64
    assert cfg.generator.max_tokens == 320
    assert cfg.learner.loss == "grpo"
    assert cfg.learner.lr == pytest.approx(float(tiny_raw()["learner"]["lr"]))
    assert cfg.learner.micro_batch_tokens == 16384
    # Fields the file leaves out keep their defaults.
    assert cfg.buffer.max_groups == 4096


def test_qwen3_dapo_yaml_loads_if_present():
    path = ROOT / "configs" / "qwen3-1.7b-dapo-math.yaml"
    if not path.exists():
        pytest.skip(f"{path.name} not present")
    cfg = load_config(path)
    assert cfg.learner.loss in ("grpo", "dapo", "gspo")


def test_to_dict_round_trips():
    cfg = load_config(TINY)
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_empty_mapping_gives_defaults():
    assert config_from_dict({}) == Config()


# --- unknown names -------------------------------------------------------------

def test_unknown_key_in_section_names_dotted_path_and_known_fields():
    msg = error_of({"learner": {"lrr": 1e-5}})
    assert "learner.lrr" in msg
    for known in LearnerConfig.__struct_fields__:
        assert known in msg


def test_unknown_section_is_rejected():
    msg = error_of({"lerner": {"lr": 1e-5}})
    assert "lerner" in msg
    assert "learner" in msg  # the known sections are listed


# --- bad values ----------------------------------------------------------------

def test_bad_literal_names_field_and_allowed_values():
    msg = error_of({"learner": {"loss": "foo"}})
    assert "learner.loss" in msg
    for allowed in ("'grpo'", "'dapo'", "'gspo'"):
        assert allowed in msg


@pytest.mark.parametrize("section,key,value", [
    ("learner", "lr", -1e-5),
    ("learner", "lr", 0.0),
    ("generator", "group_size", 1),
    ("generator", "top_p", 0.0),
    ("generator", "top_p", 1.5),
    ("generator", "temperature", -0.1),
    ("pruner", "rho", 1.1),
    ("buffer", "max_groups", 0),
])
def test_out_of_range_value_names_field(section, key, value):
    msg = error_of({section: {key: value}})
    assert f"{section}.{key}" in msg


def test_wrong_type_names_field():
    msg = error_of({"generator": {"group_size": "eight"}})
    assert "generator.group_size" in msg


def test_bool_error_lists_true_false():
    msg = error_of({"run": {"progress": "maybe"}})
    assert "run.progress" in msg and "true, false" in msg


def test_section_that_is_not_a_mapping():
    msg = error_of({"learner": 5})
    assert "learner" in msg


# --- --set overrides ------------------------------------------------------------

def test_overrides_apply_with_yaml_scalar_typing():
    cfg = config_from_dict(tiny_raw(), [
        "learner.lr=1e-5",  # YAML 1.1 reads this as a string; it must still become a float
        "learner.loss=dapo",
        "generator.group_size=4",
        "run.progress=false",
        "data.answer_regex=Answer=(.*)",
    ])
    assert cfg.learner.lr == pytest.approx(1e-5)
    assert isinstance(cfg.learner.lr, float)
    assert cfg.learner.loss == "dapo"
    assert cfg.generator.group_size == 4
    assert cfg.run.progress is False
    assert cfg.data.answer_regex == "Answer=(.*)"
    # Values the overrides did not touch come from the file.
    assert cfg.learner.micro_batch_tokens == 16384


def test_override_does_not_mutate_the_input_dict():
    raw = tiny_raw()
    before = raw["learner"]["lr"]
    config_from_dict(raw, ["learner.lr=1e-5"])
    assert raw["learner"]["lr"] == before != 1e-5


def test_override_value_keeps_equals_signs():
    cfg = config_from_dict({}, ["model.path=/tmp/a=b"])
    assert cfg.model.path == "/tmp/a=b"


def test_override_creates_missing_section():
    cfg = config_from_dict({}, ["buffer.max_groups=70"])
    assert cfg.buffer.max_groups == 70


def test_buffer_must_hold_the_groups_april_keeps_in_flight():
    with pytest.raises(ConfigError, match=r"buffer.max_groups \(15\) is below the 16 groups"):
        config_from_dict({"generator": {"target_groups": 8, "overprovision": 2.0}, "buffer": {"max_groups": 15}})
    assert config_from_dict({"mode": "sync", "generator": {"target_groups": 8, "overprovision": 2.0},
                             "buffer": {"max_groups": 8}})
    with pytest.raises(ConfigError, match=r"below the 16 groups mode='april'"):
        config_from_dict({"mode": "april", "generator": {"target_groups": 8, "overprovision": 2.0},
                          "buffer": {"max_groups": 15}})
    with pytest.raises(ConfigError, match="generator.overprovision"):
        config_from_dict({"generator": {"overprovision": 0.5}})
    with pytest.raises(ConfigError, match="allowed values: 'restart', 'drop'"):
        config_from_dict({"buffer": {"stale_policy": "evict"}})
    with pytest.raises(ConfigError, match="buffer.max_staleness"):
        config_from_dict({"buffer": {"max_staleness": -1}})


def test_head_options_are_read_by_arrol_only():
    """balance and min_head_auc belong to the head; the none and random
    ablations of an arrol config (bench e2e's sync, bench pruning's random)
    take them as they are and do not read them."""
    for mode in ("none", "random"):
        cfg = config_from_dict({"pruner": {"mode": mode, "balance": "group", "min_head_auc": 0.7, "l_detect": 8}})
        assert (cfg.pruner.balance, cfg.pruner.min_head_auc) == ("group", 0.7)
    # bench e2e's sync system: the tiny config with the pruner off.
    tiny = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    assert tiny["pruner"]["balance"] == "group" and tiny["pruner"]["min_head_auc"] > 0
    assert config_from_dict(tiny, ["mode=sync", "pruner.mode=none"]).mode == "sync"
    with pytest.raises(ConfigError, match="allowed values: 'fixed', 'group'"):
        config_from_dict({"pruner": {"mode": "arrol", "balance": "batch", "l_detect": 8}})
    with pytest.raises(ConfigError, match="pruner.min_head_auc"):
        config_from_dict({"pruner": {"mode": "arrol", "min_head_auc": 1.5, "l_detect": 8}})


@pytest.mark.parametrize("policy,rollouts,tokens", [("restart", 3, None), ("drop", 3, None), ("mask", None, 3)])
def test_stale_policy_says_who_applies_the_bound(policy, rollouts, tokens):
    from stream_rl.buffer.recycling import RecyclingBuffer

    b = config_from_dict({"buffer": {"max_staleness": 3, "stale_policy": policy}}).buffer
    buf = RecyclingBuffer(2, b.max_groups, b.max_staleness, b.stale_policy)
    assert (buf.max_staleness, b.token_staleness) == (rollouts, tokens)


@pytest.mark.parametrize("override,needle", [
    ("learner.lr=-1e-5", "learner.lr"),
    ("learner.loss=foo", "learner.loss"),
    ("generator.group_size=1", "generator.group_size"),
    ("generator.top_p=0", "generator.top_p"),
    ("learner.lrr=1", "learner.lrr"),
    ("lerner.lr=1", "lerner"),
])
def test_bad_override_fails_like_the_file(override, needle):
    assert needle in error_of(tiny_raw(), [override])


def test_bad_literal_override_lists_allowed_values():
    msg = error_of(tiny_raw(), ["learner.loss=foo"])
    assert "'grpo', 'dapo', 'gspo'" in msg


@pytest.mark.parametrize("override", ["learner.lr", "lr=1", "learner.lr.x=1", ".lr=1", "learner.=1", "=1"])
def test_malformed_override_strings(override):
    msg = error_of({}, [override])
    assert "override" in msg


def test_override_into_non_mapping_section():
    msg = error_of({"learner": 5}, ["learner.lr=0.1"])
    assert "learner" in msg and "mapping" in msg


def test_load_config_applies_overrides(tmp_path):
    cfg = load_config(TINY, ["learner.lr=3e-4"])
    assert cfg.learner.lr == pytest.approx(3e-4)


# --- cross-field checks ------------------------------------------------------------

def test_p_min_above_p_max():
    msg = error_of({"pruner": {"p_min": 0.9, "p_max": 0.5}})
    assert "pruner.p_min" in msg and "pruner.p_max" in msg


def test_p_min_equal_p_max_is_fine():
    cfg = config_from_dict({"pruner": {"p_min": 0.5, "p_max": 0.5}})
    assert cfg.pruner.p_min == cfg.pruner.p_max


def test_chunk_tokens_above_max_tokens():
    msg = error_of({"generator": {"chunk_tokens": 500, "max_tokens": 100}})
    assert "generator.chunk_tokens" in msg and "generator.max_tokens" in msg


def test_uni_executor_runs_one_rank():
    msg = error_of({"generator": {"executor": "uni", "tensor_parallel_size": 2}})
    assert "generator.executor" in msg and "generator.tensor_parallel_size" in msg
    config_from_dict({"generator": {"executor": "auto", "tensor_parallel_size": 2}})
    assert "allowed values: 'auto', 'mp', 'uni'" in error_of({"generator": {"executor": "ray"}})


def test_same_request_and_stream_addr():
    addr = "tcp://127.0.0.1:7000"
    msg = error_of({"generator": {"request_addr": addr, "stream_addr": addr}})
    assert "request_addr" in msg and "stream_addr" in msg


def test_generator_addresses_of_several_generators_must_not_collide():
    # Generator 1 takes ports +2: its request port is generator 0's stream port + 1.
    msg = error_of({"generator": {"count": 2, "request_addr": "tcp://127.0.0.1:7000",
                                  "stream_addr": "tcp://127.0.0.1:7002"}})
    assert "tcp://127.0.0.1:7002 used twice" in msg and "generator.count=2" in msg
    msg = error_of({"generator": {"count": 2}, "learner": {"addr": "tcp://127.0.0.1:5558"}})
    assert "learner.addr" in msg and "5558" in msg
    assert "generator.hosts has 1 entries" in error_of({"generator": {"count": 2, "hosts": ["a"]}})
    msg = error_of({"generator": {"count": 2, "request_addr": "ipc:///tmp/x"}})
    assert "generator.request_addr must be tcp://HOST:PORT" in msg


def test_mode_is_sync_april_or_stream_and_sync_is_unpruned():
    assert config_from_dict({}).mode == "stream"
    assert config_from_dict({}, ["mode=sync"]).mode == "sync"
    assert config_from_dict({}, ["mode=april"]).mode == "april"
    assert "mode" in error_of({"mode": "async"})
    msg = error_of({"mode": "sync", "pruner": {"mode": "random", "l_detect": 32}})
    assert "mode=sync" in msg and "pruner.mode=none" in msg
    assert "section.key" in error_of({}, ["learner=1"])


@pytest.mark.parametrize("old", ["april", "sync"])
def test_the_old_schedule_key_is_refused_naming_the_new_one(old):
    for raw, overrides in (({"generator": {"mode": old}}, []), ({}, [f"generator.mode={old}"])):
        msg = error_of(raw, overrides)
        assert "generator.mode" in msg and "top-level key `mode`" in msg and f"mode={old}" in msg


def test_prompt_tokens_leave_no_room_for_response():
    msg = error_of({"data": {"max_prompt_tokens": 512}, "model": {"max_model_len": 512}})
    assert "data.max_prompt_tokens" in msg and "model.max_model_len" in msg
    # One token of room is enough.
    config_from_dict({"data": {"max_prompt_tokens": 511}, "model": {"max_model_len": 512}})


def test_cross_field_check_applies_to_overrides():
    msg = error_of(tiny_raw(), ["generator.chunk_tokens=1000"])
    assert "generator.chunk_tokens" in msg


# --- files ---------------------------------------------------------------------

@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_yaml_that_is_not_a_mapping(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_empty_yaml_file_gives_defaults(tmp_path):
    p = tmp_path / "empty.yaml"
    p.write_text("")
    assert load_config(p) == Config()


def test_invalid_yaml_syntax(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("learner: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)


def test_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="not found") as info:
        load_config(p)
    assert str(p) in str(info.value)


def test_directory_is_not_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path)


def test_arrol_needs_the_streamed_logprobs():
    msg = error_of({"pruner": {"mode": "arrol", "l_detect": 32}, "generator": {"return_logprobs": False}})
    assert "pruner.mode=arrol" in msg and "generator.return_logprobs" in msg
    config_from_dict({"pruner": {"mode": "random", "l_detect": 32}, "generator": {"return_logprobs": False}})


# --- the pruning correction: what "ht" resolves to, and what it refuses --------------------------

PRUNED = {"pruner": {"mode": "random", "l_detect": 32}}


@pytest.mark.parametrize("section,key,value,needle", [
    ("pruner", "small_groups", "drop", "pruner.small_groups=drop"),
    ("learner", "drop_zero_variance_groups", True, "learner.drop_zero_variance_groups"),
])
def test_ht_refuses_options_without_an_exact_inclusion_probability(section, key, value, needle):
    raw = {"pruner": dict(PRUNED["pruner"]), "learner": {}}
    raw.setdefault(section, {})[key] = value
    msg = error_of(raw)
    assert "learner.pruning_correction=ht" in msg and needle in msg and "pruning_correction: none" in msg
    # Uncorrected, or without a pruner, they are allowed.
    config_from_dict({**raw, "learner": {**raw["learner"], "pruning_correction": "none"}})
    config_from_dict({**raw, "pruner": {**raw["pruner"], "mode": "none"}})


def test_ht_refuses_stale_drop_but_not_restart_or_mask():
    msg = error_of({**PRUNED, "buffer": {"max_staleness": 2, "stale_policy": "drop"}})
    assert "buffer.stale_policy=drop" in msg
    for policy in ("restart", "mask"):
        config_from_dict({**PRUNED, "buffer": {"max_staleness": 2, "stale_policy": policy}})
    config_from_dict({**PRUNED, "buffer": {"max_staleness": None, "stale_policy": "drop"}})  # no bound: no drop


@pytest.mark.parametrize("raw,std,budget", [
    ({}, True, None),  # no pruning: GRPO's std, DAPO's token count
    (PRUNED, False, 256),  # ht with pruning before the reward: the unbiased forms
    ({**PRUNED, "learner": {"pruning_correction": "none"}}, True, None),
    ({"learner": {"dppo_completion_rate": 0.5}}, True, 256),  # after the reward: std stays exact
    ({"data": {"dppo_prompt_rate": 0.5}}, True, 256),
    ({**PRUNED, "learner": {"adv_scale": "std", "dapo_norm": "tokens"}}, True, None),  # the consistent forms, asked for
    ({"learner": {"adv_scale": "none", "dapo_norm": "budget"}}, False, 256),
])
def test_what_the_correction_resolves_to(raw, std, budget):
    cfg = config_from_dict(raw)
    assert (cfg.adv_std, cfg.dapo_token_budget) == (std, budget)


def test_default_correction_is_ht():
    assert LearnerConfig().pruning_correction == "ht"
    assert load_config(TINY).learner.pruning_correction == "ht"


# --- data and eval: the keys a user's own dataset sets -----------------------------------------

def test_system_prompt_needs_the_chat_template():
    msg = error_of({"data": {"system_prompt": "Think."}})
    assert "data.system_prompt" in msg and "data.apply_chat_template" in msg
    config_from_dict({"data": {"system_prompt": "Think.", "apply_chat_template": True}})


def test_eval_inherits_the_data_answer_key_unless_set():
    cfg = config_from_dict({"data": {"answer_field": "solution", "answer_regex": r"= (\d+)", "answer_match": "exact"}})
    assert (cfg.eval.answer_field, cfg.eval.answer_regex, cfg.eval.answer_match) == ("solution", r"= (\d+)", "exact")
    cfg = config_from_dict({"data": {"answer_field": "solution"}, "eval": {"answer_field": "final", "answer_regex": None}})
    assert (cfg.eval.answer_field, cfg.eval.answer_regex, cfg.eval.answer_match) == ("final", None, "math")
    # --set data.* reaches eval too; the resolved config reloads unchanged.
    cfg = config_from_dict({}, ["data.answer_field=target"])
    assert cfg.eval.answer_field == "target" and config_from_dict(config_to_dict(cfg)) == cfg
    assert config_from_dict({}).eval.answer_regex is None  # math-verify's extraction, as data's


def test_tiny_eval_votes_on_the_tasks_final_answer():
    from stream_rl.tiny.task import ANSWER_REGEX

    cfg = load_config(TINY)
    assert (cfg.eval.answer_field, cfg.eval.answer_regex, cfg.eval.answer_match) == ("answer", ANSWER_REGEX, "math")
    assert (cfg.data.answer_field, cfg.data.answer_regex) == ("solution", None)


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_data_formats_are_allowed(fmt):
    assert config_from_dict({"data": {"format": fmt}}).data.format == fmt


@pytest.mark.parametrize("override, field", [
    ("learner.lr=.inf", "learner.lr"), ("learner.grad_clip=.inf", "learner.grad_clip"),
    ("pruner.lam=.inf", "pruner.lam"), ("generator.temperature=.inf", "generator.temperature"),
    ("learner.kl_beta=.inf", "learner.kl_beta")])
def test_non_finite_numbers_are_refused_naming_the_field(override, field):
    msg = error_of({}, [override])
    assert f"{field}: must be a finite number" in msg


@pytest.mark.parametrize("override", ["learner.addr=notanaddr", "learner.reply_addr=tcp://127.0.0.1",
                                      "generator.stream_addr=tcp://:5556", "generator.request_addr=udp://h:1",
                                      "learner.addr=tcp://h:70000"])
def test_malformed_addresses_are_refused_naming_the_field(override):
    field, _, value = override.partition("=")
    msg = error_of({}, [override])
    assert field in msg and repr(value) in msg and "tcp://HOST:PORT" in msg


def test_good_addresses_load():
    cfg = config_from_dict({}, ["learner.addr=ipc:///tmp/learner.sock", "learner.reply_addr=tcp://[::1]:5571"])
    assert cfg.learner.addr == "ipc:///tmp/learner.sock"


def test_a_default_job_checkpoints_periodically():
    # A killed long run with the defaults must have something to resume.
    assert config_from_dict({}).run.checkpoint_every > 0
