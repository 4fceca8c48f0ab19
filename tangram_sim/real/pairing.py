"""Whether a simulation and a replay belong together, before `tangram-sim compare` reads them.

- each folder is the kind its argument says (run.json `kind`: "run" for SIM_DIR, "replay" for
  REPLAY_DIR); swapped arguments are refused with the command that works;
- the simulation's configuration is the replay's `experiment.sim.yaml` (what `tangram-sim run
  REPLAY/experiment.sim.yaml --calibration CAL` simulates): both are resolved and hashed without the
  keys that do not change the workload or the cluster (calibration, outputs, description, real, slo,
  where the checkpoints lie), and any other difference is named, so a simulation of another cluster is
  not read as a +100000% error of the simulator;
- the fidelity files go to a folder of their own, never into a finished run.

Pure Python (no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tangram_sim.errors import ConfigError, TangramError
from tangram_sim.rundir import RunDirError, read_record

__all__ = ["check_kinds", "check_out", "config_differences", "default_out"]

# `slo` only sets what the summary measures against, not what is simulated or replayed
IGNORED = ("calibration", "outputs", "description", "real", "name", "slo")


def check_kinds(sim_dir: Path, real_dir: Path) -> None:
    """SIM_DIR holds a simulation and REPLAY_DIR a replay; one line with the fix otherwise."""
    kinds = {}
    for d in (sim_dir, real_dir):
        if not d.is_dir():
            raise TangramError(f"{d}: not a directory; expected a run directory")
        try:
            record = read_record(d)
        except RunDirError:
            record = None
        kinds[d] = record.kind if record is not None else None
    sim_kind, real_kind = kinds[sim_dir], kinds[real_dir]
    if sim_kind == "replay" and real_kind == "run":
        raise ConfigError(f"compare: the arguments are swapped ({sim_dir} is a replay, {real_dir} a simulation); "
                          f"the simulation comes first: tangram-sim compare {real_dir} {sim_dir}")
    if sim_kind == "replay":
        raise ConfigError(f"compare: SIM_DIR {sim_dir} is a replay (run.json kind replay); expected the run "
                          "directory of a simulation (tangram-sim run REPLAY/experiment.sim.yaml)")
    if real_kind == "run":
        raise ConfigError(f"compare: REPLAY_DIR {real_dir} is a simulation (run.json kind run); expected the "
                          "run directory of a replay (tangram-sim real replay)")


def _normal(config: Any) -> Any:
    if not isinstance(config, dict):
        return config
    out = {k: v for k, v in config.items() if k not in IGNORED}
    models = out.get("models")
    if isinstance(models, list):  # where the checkpoints lie is not what they hold
        out["models"] = [{**m, "checkpoint": Path(str(m["checkpoint"])).name}
                         if isinstance(m, dict) and m.get("checkpoint") else m for m in models]
    return out


def _diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in list(dict.fromkeys([*a, *b])):
            where = f"{prefix}.{key}" if prefix else str(key)
            if key not in a or key not in b:
                out.append(where)
            else:
                out += _diff(a[key], b[key], where)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _diff(x, y, f"{prefix}.{i}" if prefix else str(i))]
    return [] if a == b else [prefix or "(the whole configuration)"]


def config_differences(sim_dir: Path, real_dir: Path) -> str | None:
    """None when the simulation's config.yaml is the replay's experiment.sim.yaml (same hash of the
    resolved configurations, `IGNORED` keys aside); otherwise a line saying what differs, or why it
    cannot be checked."""
    import yaml

    from tangram_sim.experiments.config import load_yaml
    from tangram_sim.experiments.runner import prepare
    from tangram_sim.rundir import config_hash

    sim_yaml = real_dir / "experiment.sim.yaml"
    if not sim_yaml.is_file():
        return f"{real_dir} has no experiment.sim.yaml, so {sim_dir} cannot be checked to simulate this replay"
    try:
        raw, base = load_yaml(sim_yaml)
        expected, _ = prepare(raw, base)
        actual = yaml.safe_load((sim_dir / "config.yaml").read_text())
    except (TangramError, OSError, yaml.YAMLError, UnicodeDecodeError) as exc:
        return f"cannot check that {sim_dir} simulates {sim_yaml} ({' '.join(str(exc).split())[:200]})"
    expected, actual = _normal(expected), _normal(actual)
    if config_hash(expected) == config_hash(actual):
        return None
    keys = _diff(expected, actual)
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return (f"{sim_dir} was not simulated from {sim_yaml} (config {config_hash(actual)}, expected "
            f"{config_hash(expected)}; differs in {shown}): the errors below compare different experiments")


def default_out(sim_dir: Path, real_dir: Path) -> Path:
    """`compare/<sim>-vs-<replay>/` beside the simulation's folder."""
    sim, real = Path(sim_dir).resolve(), Path(real_dir).resolve()
    return sim.parent / "compare" / f"{sim.name}-vs-{real.name}"


def check_out(out: Path) -> None:
    """Fidelity files never go into a run, replay or tune folder (their run.json lists what they hold)."""
    for record in ("run.json", "tune.json"):
        if (out / record).is_file():
            raise ConfigError(f"--out {out}: holds a finished run ({record}); fidelity files go into a folder "
                              "of their own (default: compare/<sim>-vs-<replay>/ beside the simulation)")
