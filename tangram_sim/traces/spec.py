"""Build the request trace of an experiment from its YAML `trace` section.

One entry point, `load_trace`, so the simulator and the real replay get the very same requests for
the same seed. Randomness comes from independent streams derived from the seed
(`default_rng([seed, stream])`), so adding e.g. a mapping never shifts the synthetic arrivals.
Every key is checked; an unknown or mistyped one names `trace.<key>`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tangram_sim.errors import TraceError, shown
from tangram_sim.traces import formats
from tangram_sim.traces.mapping import apply_mapping
from tangram_sim.traces.synthetic import ARRIVALS, Diurnal, synthesize
from tangram_sim.traces.window import window

KINDS = ("azure-llm", "azure-functions", "azure-functions-2021", "servegen", "servegen-pool", "burstgpt", "table",
         "synthetic")
_COMMON = ("kind", "path", "mapping", "start_s", "duration_s", "max_requests", "rate_scale")
_FUNCTION_KEYS = ("token_source", "input_tokens", "output_tokens", "top_functions", "function_models")
KIND_KEYS: dict[str, tuple[str, ...]] = {
    "azure-llm": (),
    "table": (),
    "burstgpt": (),
    "servegen": ("model_ids",),
    "servegen-pool": ("data", "pools", "span", "target_rps", "alpha"),
    "azure-functions": ("spread", "minutes") + _FUNCTION_KEYS,
    "azure-functions-2021": _FUNCTION_KEYS,
    "synthetic": (
        "n_requests",
        "rate",
        "arrival",
        "cv",
        "alpha",
        "diurnal",
        "input_mean",
        "output_mean",
        "input_sigma",
        "output_sigma",
        "max_tokens",
        "token_source",
    ),
}

# Independent random streams per purpose: default_rng([seed, stream]).
STREAM_SYNTH, STREAM_SPREAD, STREAM_TOKENS, STREAM_MAPPING = 0, 1, 2, 3


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _num(
    spec: Mapping[str, Any],
    key: str,
    default: Any = None,
    *,
    minimum: float | None = None,
    positive: bool = False,
    integer: bool = False,
) -> Any:
    """A numeric key, type- and range-checked, or `default` when absent."""
    if key not in spec or spec[key] is None:
        return default
    value = spec[key]
    if integer:
        ok = isinstance(value, int | np.integer) and not isinstance(value, bool)
        what = "an integer"
    else:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and bool(np.isfinite(value))
        what = "a number"
    if ok and positive and value <= 0:
        ok = False
    if ok and minimum is not None and value < minimum:
        ok = False
    if not ok:
        bound = " > 0" if positive else (f" >= {minimum:g}" if minimum is not None else "")
        raise TraceError(f"trace.{key}: expected {what}{bound}, got {value!r}")
    return value


def resolve_path(value: Any, base_dir: Path | None, key: str = "trace.path") -> Path:
    """A trace file: absolute, else relative to `base_dir` (the experiment's folder), else to the cwd."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise TraceError(f"{key}: expected a file path, got {value!r}")
    p = Path(value).expanduser()
    candidates = (
        [p] if p.is_absolute() else ([base_dir / p] if base_dir is not None else []) + [Path.cwd() / p]
    )
    for c in candidates:
        if c.is_file():
            return c
    looked = ", ".join(str(c) for c in candidates)
    raise TraceError(f"{key}: file not found: '{value}' (looked for {looked})")


def _token_table(spec: Mapping[str, Any], base_dir: Path | None, skip_bad_rows: bool) -> pd.DataFrame | None:
    if spec.get("token_source") is None:
        return None
    path = resolve_path(spec["token_source"], base_dir, "trace.token_source")
    table = formats.read_trace(path, skip_bad_rows=skip_bad_rows)
    return table[["input_tokens", "output_tokens"]]


def _function_models(spec: Mapping[str, Any], models: Sequence[str]) -> dict[str, str] | None:
    value = spec.get("function_models")
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise TraceError(f"trace.function_models: expected a mapping function hash -> model, got {value!r}")
    for fn, model in value.items():
        if model not in models:
            raise TraceError(
                f"trace.function_models.{fn}: '{model}' is not one of the models ({', '.join(models)})"
            )
    return {str(k): str(v) for k, v in value.items()}


def _model_ids(spec: Mapping[str, Any], models: Sequence[str]) -> Sequence[str] | dict[int, str]:
    value = spec.get("model_ids")
    if value is None:
        return list(models)
    if isinstance(value, Mapping):
        out: dict[int, str] = {}
        for k, v in value.items():
            try:
                key = int(k)
            except (TypeError, ValueError):
                raise TraceError(f"trace.model_ids.{k}: expected an integer model id") from None
            if not isinstance(v, str):
                raise TraceError(f"trace.model_ids.{k}: expected a model name, got {v!r}")
            out[key] = v
        return out
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return value
    raise TraceError(
        f"trace.model_ids: expected a list of model names (id i -> item i) or a mapping, got {value!r}"
    )


def resolve_dir(value: Any, base_dir: Path | None, key: str) -> Path:
    """A folder (or file): absolute, else relative to `base_dir`, else to the cwd."""
    if not isinstance(value, str | Path) or not str(value).strip():
        raise TraceError(f"{key}: expected a folder path, got {value!r}")
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else ([base_dir / p] if base_dir is not None else []) + [Path.cwd() / p]
    for c in candidates:
        if c.exists():
            return c
    raise TraceError(f"{key}: not found: '{value}' (looked for {', '.join(str(c) for c in candidates)})")


def _servegen_pool(spec: Mapping[str, Any], models: Sequence[str], seed: int, base_dir: Path | None) -> pd.DataFrame:
    from tangram_sim.traces.servegen_pool import generate

    if "path" in spec:
        raise TraceError("trace.path: not used by kind 'servegen-pool' (give the ServeGen data folder as trace.data)")
    if "data" not in spec:
        raise TraceError("trace.data: missing; expected the ServeGen data folder or the extract (e.g. traces/servegen)")
    data = resolve_dir(spec["data"], base_dir, "trace.data")
    if not data.is_dir():
        raise TraceError(f"trace.data: expected a folder, got the file {data}")
    pools = spec.get("pools")
    if not isinstance(pools, Mapping) or not pools:
        raise TraceError(
            "trace.pools: expected a mapping pool -> model names, e.g. {m-mid: [llama-3-8b, yi-9b]}, "
            f"got {pools!r}"
        )
    seen: dict[str, str] = {}
    clean: dict[str, list[str]] = {}
    for pool, names in pools.items():
        where = f"trace.pools.{pool}"
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise TraceError(f"{where}: expected a non-empty list of model names, got {names!r}")
        for n in names:
            if n not in models:
                raise TraceError(f"{where}: '{n}' is not one of the models ({', '.join(models)})")
            if n in seen:
                raise TraceError(f"{where}: '{n}' is already in pool {seen[n]}; a model serves one pool")
            seen[n] = str(pool)
        clean[str(pool)] = list(names)
    unused = [m for m in models if m not in seen]
    if unused:
        raise TraceError(f"trace.pools: model '{unused[0]}' is in no pool, so it would get no requests")
    span = spec.get("span", [0, 3600])
    ok = (
        isinstance(span, list | tuple) and len(span) == 2
        and all(isinstance(v, int | float) and not isinstance(v, bool) and np.isfinite(v) for v in span)
        and 0 <= span[0] < span[1]
    )
    if not ok:
        raise TraceError(f"trace.span: expected [start, end] seconds with 0 <= start < end, got {span!r}")
    target = _num(spec, "target_rps", positive=True)
    alpha = _num(spec, "alpha", 0.0, minimum=0.0)
    return generate(data, clean, (float(span[0]), float(span[1])), seed,
                    target_rps=None if target is None else float(target), alpha=float(alpha))


def _read(
    kind: str,
    spec: Mapping[str, Any],
    models: Sequence[str],
    seed: int,
    base_dir: Path | None,
    skip_bad_rows: bool,
) -> pd.DataFrame:
    """The trace before windowing, as the file (or generator) gives it."""
    if kind == "servegen-pool":
        return _servegen_pool(spec, models, seed, base_dir)
    if kind == "synthetic":
        if "path" in spec:
            raise TraceError("trace.path: not used by kind 'synthetic' (the trace is generated)")
        n = _num(spec, "n_requests", integer=True, minimum=1)
        duration = _num(spec, "duration_s", positive=True)
        if n is None and duration is None:
            raise TraceError("trace.n_requests: give n_requests or duration_s for a synthetic trace")
        rate = _num(spec, "rate", positive=True)
        if rate is None:
            raise TraceError("trace.rate: missing; expected the mean request rate in requests/s")
        arrival = spec.get("arrival", "poisson")
        if arrival not in ARRIVALS:
            raise TraceError(f"trace.arrival: expected one of {', '.join(ARRIVALS)}, got {arrival!r}")
        diurnal = spec.get("diurnal")
        return synthesize(
            models,
            _rng(seed, STREAM_SYNTH),
            rate=float(rate),
            n_requests=n,
            duration_s=duration,
            arrival=arrival,
            cv=float(_num(spec, "cv", 1.0, positive=True)),
            zipf_alpha=float(_num(spec, "alpha", 0.0, minimum=0.0)),
            diurnal=None if diurnal is None else Diurnal.from_config(diurnal, "trace.diurnal"),
            input_mean=float(_num(spec, "input_mean", 1024.0, positive=True)),
            output_mean=float(_num(spec, "output_mean", 256.0, positive=True)),
            input_sigma=float(_num(spec, "input_sigma", 1.0, minimum=0.0)),
            output_sigma=float(_num(spec, "output_sigma", 1.0, minimum=0.0)),
            max_tokens=_num(spec, "max_tokens", integer=True, minimum=1),
            token_table=_token_table(spec, base_dir, skip_bad_rows),
        )
    if "path" not in spec:
        raise TraceError(f"trace.path: missing; kind '{kind}' reads a trace file")
    path = resolve_path(spec["path"], base_dir)
    if kind == "azure-llm":
        return formats.read_azure_llm(path, skip_bad_rows=skip_bad_rows)
    if kind == "table":
        return formats.read_table(path, skip_bad_rows=skip_bad_rows)
    if kind == "burstgpt":
        return formats.read_burstgpt(path, skip_bad_rows=skip_bad_rows)
    if kind == "servegen":
        return formats.read_servegen(path, model_ids=_model_ids(spec, models), skip_bad_rows=skip_bad_rows)
    # Function traces.
    common: dict[str, Any] = {
        "rng": _rng(seed, STREAM_SPREAD),
        "token_table": _token_table(spec, base_dir, skip_bad_rows),
        "token_rng": _rng(seed, STREAM_TOKENS),
        "input_tokens": _num(spec, "input_tokens", formats.DEFAULT_INPUT_TOKENS, integer=True, minimum=1),
        "output_tokens": _num(spec, "output_tokens", formats.DEFAULT_OUTPUT_TOKENS, integer=True, minimum=1),
        "top_functions": _num(spec, "top_functions", integer=True, minimum=1),
        "function_models": _function_models(spec, models),
        "skip_bad_rows": skip_bad_rows,
    }
    if common["function_models"] is not None and spec.get("mapping") is not None:
        raise TraceError("trace.mapping: give either mapping or function_models, not both")
    if kind == "azure-functions-2021":
        return formats.read_azure_functions_2021(path, **common)
    spread = spec.get("spread", "poisson")
    if spread not in formats.SPREADS:
        raise TraceError(f"trace.spread: expected one of {', '.join(formats.SPREADS)}, got {spread!r}")
    minutes = spec.get("minutes")
    if minutes is not None:
        ok = (
            isinstance(minutes, list | tuple)
            and len(minutes) == 2
            and all(isinstance(m, int) and not isinstance(m, bool) for m in minutes)
            and 1 <= minutes[0] <= minutes[1]
        )
        if not ok:
            raise TraceError(
                f"trace.minutes: expected [first, last] minutes with 1 <= first <= last, got {minutes!r}"
            )
        minutes = (int(minutes[0]), int(minutes[1]))
    return formats.read_azure_functions(path, spread=spread, minutes=minutes, **common)


def load_trace(
    spec: Mapping[str, Any],
    models: Sequence[str],
    seed: int,
    base_dir: Path | None = None,
    skip_bad_rows: bool = False,
) -> pd.DataFrame:
    """The canonical trace described by an experiment's `trace` section; same seed -> same table.

    Steps: read or synthesize; map models (per request for traces without a model column and for
    synthetic ones, per label for traces with function or service labels); check every model is one
    of `models`; then window (`start_s`, `duration_s`, `max_requests`) and compress time
    (`rate_scale`). `df.attrs` records the source, format and `skipped_rows`.
    """
    if not isinstance(spec, Mapping):
        raise TraceError(f"trace: expected a mapping with at least 'kind', got {shown(spec)}")
    kind = spec.get("kind")
    if kind not in KIND_KEYS:
        raise TraceError(f"trace.kind: expected one of {', '.join(KINDS)}, got {shown(kind)}")
    allowed = _COMMON + KIND_KEYS[kind]
    for key in spec:
        if key not in allowed:
            raise TraceError(
                f"trace.{key}: unknown key for kind '{kind}'; expected one of {', '.join(allowed)}"
            )
    models = list(models)
    if not models or not all(isinstance(m, str) and m for m in models):
        raise TraceError(f"trace: expected a non-empty list of model names to replay, got {models!r}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise TraceError(f"seed: expected an integer >= 0, got {seed!r}")
    seed = int(seed)

    df = _read(kind, spec, models, seed, base_dir, skip_bad_rows)
    attrs = dict(df.attrs)
    mapping = spec.get("mapping")
    has_models = not df["model"].isna().all()
    if mapping is not None:
        if kind == "synthetic" and "alpha" in spec:
            raise TraceError("trace.mapping: give either alpha or mapping for a synthetic trace, not both")
        per = "request" if kind == "synthetic" else "auto"
        df = apply_mapping(df, models, mapping, _rng(seed, STREAM_MAPPING), per=per, where="trace.mapping")
    elif not has_models:
        raise TraceError(
            f"trace.mapping: required, the {kind} trace has no model column; "
            "e.g. {kind: zipf, alpha: 1.0} or {kind: round-robin}"
        )
    elif attrs.get("models_are_labels") and kind in ("azure-functions", "azure-functions-2021"):
        raise TraceError(
            f"trace.mapping: required, the {kind} trace names functions, not models; "
            "e.g. {kind: round-robin} or trace.function_models"
        )
    unknown = sorted(set(df["model"].unique().tolist()) - set(models))
    if unknown:
        raise TraceError(
            f"trace: model '{unknown[0]}' in {attrs.get('source', kind)} is not one of the models "
            f"({', '.join(models)}); add a trace.mapping or fix the names"
        )
    df = window(
        df,
        start_s=_num(spec, "start_s", 0.0, minimum=0.0),
        duration_s=_num(spec, "duration_s", positive=True) if kind != "synthetic" else None,
        max_requests=_num(spec, "max_requests", integer=True, minimum=1),
        rate_scale=_num(spec, "rate_scale", 1.0, positive=True),
        where="trace",
    )
    df.attrs = {**attrs, "models_are_labels": False, "kind": kind}
    return df
