"""Every number of the experiment schema and of system overrides: finite, in range, named by dotted key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from tangram_sim.errors import ConfigError
from tangram_sim.experiments.config import build_models, load_yaml, parse_set, set_dotted, validate
from tangram_sim.sim.hardware import gpu_spec
from tangram_sim.sim.systems import make_system

ROOT = Path(__file__).resolve().parents[1]
CODE_TRACE = ROOT / "traces/azure_llm_2023/AzureLLMInferenceTrace_code.csv"
NAN, INF = math.nan, math.inf


def small(**changes: object) -> dict:
    raw = {
        "name": "t",
        "cluster": {"gpus_per_node": 1, "gpu_memory_gib": 40},
        "models": [{"name": "qwen2.5-3b"}, {"name": "llama-3-8b"}],
        "trace": {"kind": "azure-llm", "path": str(CODE_TRACE), "max_requests": 20},
        "systems": [{"name": "sllm", "preset": "serverlessllm"}, {"name": "tangram", "preset": "tangram"}],
    }
    for key, value in changes.items():
        set_dotted(raw, key, value)
    return raw


# (dotted key, bad value, expected start of the message after "<key>: ")
BAD_NUMBERS = [
    ("seed", -1, "expected an integer >= 0, got -1"),
    ("seed", 1.5, "expected an integer >= 0, got 1.5"),
    ("cluster.nodes", 0, "expected an integer >= 1, got 0"),
    ("cluster.gpus_per_node", NAN, "expected an integer >= 1, got nan"),
    ("cluster.gpu_memory_gib", NAN, "expected a positive value, got nan"),
    ("cluster.gpu_memory_gib", INF, "expected a positive value, got inf"),
    ("cluster.gpu_memory_gib", 0, "expected a positive value, got 0"),
    ("cluster.gpu_memory_gib", 10**400, "expected a positive value"),
    ("cluster.compute_efficiency", NAN, "expected a number in (0, 1], got nan"),
    ("cluster.compute_efficiency", 50, "expected a number in (0, 1], got 50"),
    ("cluster.compute_efficiency", 0, "expected a number in (0, 1], got 0"),
    ("cluster.memory_efficiency", -INF, "expected a number in (0, 1], got -inf"),
    ("cluster.memory_efficiency", True, "expected a number in (0, 1], got True"),
    ("cluster.tiers.host_cache_gib", NAN, "expected a number >= 0, got nan"),
    ("cluster.tiers.host_cache_gib", -5, "expected a number >= 0, got -5"),
    ("cluster.tiers.ssd_gbps", NAN, "expected a positive value, got nan"),
    ("cluster.tiers.network_gbps", INF, "expected a positive value, got inf"),
    ("cluster.tiers.unit_overhead_s", -100, "expected a number >= 0, got -100"),
    ("cluster.tiers.unit_overhead_s", NAN, "expected a number >= 0, got nan"),
    ("cluster.gpu_overrides.pcie_bps", NAN, "expected a positive number, got nan"),
    ("cluster.gpu_overrides.bf16_flops", INF, "expected a positive number, got inf"),
    ("cluster.gpu_overrides.hbm_bps", True, "expected a positive number, got True"),
    ("models.0.sensitivity", NAN, "expected a positive value, got nan"),
    ("models.1.tensor_parallel", 0, "expected an integer >= 1, got 0"),
    ("models.1.derive", {"base": "qwen2.5-3b", "share_first_layers": NAN},
     "expected a number in [0, 1], got nan"),
    ("systems.0.overrides", {"keep_alive_s": NAN}, "expected a number >= 0, got nan"),
    ("systems.0.overrides", {"keep_alive_s": -1}, "expected a number >= 0, got -1"),
    ("systems.1.overrides", {"engine_overhead_s": INF}, "expected a number >= 0, got inf"),
    ("systems.1.overrides", {"fairness_window_s": NAN}, "expected a number >= 0, got nan"),
    ("systems.1.overrides", {"kv_fraction": NAN}, "expected a number in (0, 1], got nan"),
    ("systems.1.overrides", {"kv_fraction": 1.5}, "expected a number in (0, 1], got 1.5"),
    ("systems.1.overrides", {"max_batch": 0}, "expected an integer >= 1, got 0"),
    ("systems.1.overrides", {"prefill_batch": -1}, "expected an integer >= 0, got -1"),
    ("systems.1.overrides", {"keep_alive_s": 10**400}, "expected a number >= 0"),
    ("outputs.sample_interval_s", NAN, "expected auto or a number >= 0, got nan"),
    ("outputs.sample_interval_s", INF, "expected auto or a number >= 0, got inf"),
    ("real.time_scale", NAN, "expected a positive value, got nan"),
    ("real.readers", 0, "expected an integer >= 1, got 0"),
    ("real.chunk_mb", -1.0, "expected a positive value, got -1.0"),
]


@pytest.mark.parametrize(("key", "value", "message"), BAD_NUMBERS)
def test_bad_numbers_are_refused_naming_the_dotted_key(key: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        validate(small(**{key: value}), None)
    text = str(info.value)
    if isinstance(value, dict):  # an overrides/derive mapping: the message names the key inside it
        key = f"{key}.{next(iter(value))}" if key.endswith("overrides") else f"{key}.share_first_layers"
    assert text.startswith(f"{key}: {message}"), text
    assert "\n" not in text


def test_valid_edge_values_are_accepted() -> None:
    config = validate(
        small(**{
            "cluster.compute_efficiency": 1, "cluster.tiers.host_cache_gib": 0, "cluster.tiers.unit_overhead_s": 0,
            "systems.0.overrides": {"keep_alive_s": 0, "kv_fraction": 1}, "outputs.sample_interval_s": 0,
            "seed": 0,
        }),
        None,
    )
    assert config["cluster"]["compute_efficiency"] == 1.0
    assert config["cluster"]["tiers"]["host_cache_gib"] == 0.0


def test_exponent_numbers_without_a_dot_are_numbers(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `5e-2` as the string '5e-2'; experiment files read it as 0.05.
    path = tmp_path / "e.yaml"
    path.write_text("name: t\ncluster: {compute_efficiency: 5e-2, tiers: {ssd_gbps: 1E1}}\n"
                    "description: 5e-2 is a number\nmodels: [{name: 1e3}]\n")
    raw, _ = load_yaml(path)
    assert raw["cluster"]["compute_efficiency"] == 0.05 and raw["cluster"]["tiers"]["ssd_gbps"] == 10.0
    assert raw["description"] == "5e-2 is a number"
    assert raw["models"][0]["name"] == 1000.0  # then refused by validation as "not a model name"
    assert parse_set("cluster.compute_efficiency=5e-2") == ("cluster.compute_efficiency", 0.05)
    assert parse_set("trace.rate_scale=1.5e3") == ("trace.rate_scale", 1500.0)
    assert parse_set("name=run-5e-2") == ("name", "run-5e-2")
    assert validate(small(**{"cluster.compute_efficiency": 0.05}), None)["cluster"]["compute_efficiency"] == 0.05


def test_a_quoted_number_is_explained() -> None:
    with pytest.raises(ConfigError, match=r"^cluster.compute_efficiency: expected a number in \(0, 1\], got '0.5' "
                                          r"\(a quoted string; write the number without quotes\)$"):
        validate(small(**{"cluster.compute_efficiency": "0.5"}), None)


def test_non_utf8_experiment_file_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "trace.parquet"
    path.write_bytes(b"PAR1\x15\x04\x15\xbc\x01\xff\x00")
    with pytest.raises(ConfigError, match=r"trace.parquet: not a UTF-8 text file \(byte 0xbc at offset 7\)"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="is a folder"):
        load_yaml(tmp_path)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfname: t\n")
    assert load_yaml(bom)[0] == {"name": "t"}


def test_unknown_model_names_models_n_name() -> None:
    # caught by validate, before any job runs, and by build_models for configs validated earlier
    with pytest.raises(ConfigError, match=r"^models.1.name: unknown model 'no-such-model'"):
        validate(small(**{"models.1.name": "no-such-model"}), None)
    config = validate(small(), None)
    config["models"][1]["name"] = "no-such-model"
    with pytest.raises(ConfigError, match=r"^models.1.name: unknown model 'no-such-model'"):
        build_models(config, None)
    with pytest.raises(ConfigError, match=r"^models.1.derive.base: 'nope' is not"):
        validate(small(**{"models.1.derive": {"base": "nope", "share_first_layers": 0.5}}), None)


def test_system_overrides_name_overrides_key_and_keep_types() -> None:
    with pytest.raises(ConfigError, match=r"^s.overrides.keep_alive_s: expected a number >= 0, got nan$"):
        make_system("x", "tangram", {"keep_alive_s": NAN}, where="s")
    with pytest.raises(ConfigError, match=r"^s.overrides: expected a mapping"):
        make_system("x", "tangram", [1], where="s")  # type: ignore[arg-type]
    assert make_system("x", "tangram", {"keep_alive_s": 3}).keep_alive_s == 3.0


def test_gpu_spec_refuses_nan_and_tiny_memory() -> None:
    with pytest.raises(ConfigError, match=r"^cluster.gpu_memory_gib: expected a positive number, got nan$"):
        gpu_spec("a100-80gb", memory_gib=NAN)
    with pytest.raises(ConfigError, match=r"^cluster.gpu_memory_gib: expected at least one byte"):
        gpu_spec("a100-80gb", memory_gib=1e-12)
    assert gpu_spec("a100-80gb", {"memory_bytes": 2**30}).memory_bytes == 2**30
    assert gpu_spec("a100-80gb", {"memory_bytes": 2**30}, memory_gib=2).memory_bytes == 2 * 2**30
