"""Run configuration: YAML profiles validated into typed objects.

Each stage declares its own section class (a :class:`stages.base.StageConfig` subclass) next
to its code; this module composes them into :class:`RunConfig`, applies ``--set`` overrides
and turns any validation failure into one line that names the file and the dotted key::

    configs/local.yaml: transcribe.batch_size: must be >= 1 (got 0)

The resolved config is written to ``OUT/config.yaml`` so a run can be reproduced exactly.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stages.decode import DecodeConfig
from stages.diarize import DiarizeConfig
from stages.enhance import EnhanceConfig
from stages.filter import FilterConfig
from stages.quality import QualityConfig
from stages.roundtrip import RoundtripConfig
from stages.segment import SegmentConfig
from stages.tokenize import TokenizeConfig
from stages.transcribe import TranscribeConfig
from stages.write import WriteConfig


class ConfigError(ValueError):
    """A config problem, already phrased for the user as one line."""


class RayConfig(BaseModel):
    """How to reach Ray.

    ``address`` empty starts an embedded local Ray in-process; ``auto`` or ``ray://...``
    joins a cluster (``RAY_ADDRESS`` in the environment does the same).
    """

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(None, description="Cluster address; empty = embedded local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for the embedded Ray (default: all).")
    object_store_memory_gb: float | None = Field(
        None, gt=0, description="Object store size for the embedded Ray (default: Ray's choice)."
    )
    max_in_flight_recordings: int = Field(
        64, ge=1, description="Recordings read ahead of the writer; bounds driver memory."
    )


class ModelsConfig(BaseModel):
    """Where model references resolve."""

    model_config = ConfigDict(extra="forbid")

    cache_dir: str = Field(
        "~/.cache/kimia-curate",
        description="Cache root; bare model names resolve under it (e.g. whisper/large-v3.pt).",
    )


class FailuresConfig(BaseModel):
    """What happens when a row fails for a reason other than bad input.

    Bad input (undecodable, empty, unsupported) is quarantined at once. Anything else (an
    OS error, out of memory, a timeout, a worker that died) may pass: the row is tried again
    ``retries`` more times, waiting ``backoff_s`` and then twice as long before each retry,
    and only then quarantined as ``transient``. Transient quarantines make the run exit 3 and
    are re-run by ``kimia-curate run --retry-quarantined``.
    """

    model_config = ConfigDict(extra="forbid")

    retries: int = Field(2, ge=0, le=20, description="Further attempts after a non-input failure.")
    backoff_s: float = Field(0.5, ge=0, le=600, description="Wait before the first retry (s); doubles each time.")


class RunConfig(BaseModel):
    """The whole run: one section per stage plus Ray and model settings."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    profile: str = Field("custom", description="A name for this profile, recorded with the output.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Default device for model stages whose own `device` is auto."
    )
    ray: RayConfig = Field(default_factory=RayConfig)
    failures: FailuresConfig = Field(default_factory=FailuresConfig)
    models: ModelsConfig = Field(default_factory=ModelsConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    enhance: EnhanceConfig = Field(default_factory=lambda: EnhanceConfig(enabled=False))
    segment: SegmentConfig = Field(default_factory=SegmentConfig)
    diarize: DiarizeConfig = Field(default_factory=lambda: DiarizeConfig(enabled=False))
    transcribe: TranscribeConfig = Field(default_factory=TranscribeConfig)
    tokenize: TokenizeConfig = Field(default_factory=lambda: TokenizeConfig(enabled=False))
    roundtrip: RoundtripConfig = Field(default_factory=lambda: RoundtripConfig(enabled=False))
    quality: QualityConfig = Field(default_factory=QualityConfig)
    filter: FilterConfig = Field(default_factory=FilterConfig)
    write: WriteConfig = Field(default_factory=WriteConfig)

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    ctx = err.get("ctx") or {}
    if kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        op = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}[kind]
        bound = next(iter(ctx.values()), "?")
        return f"{loc}: must be {op} {bound} (got {err.get('input')!r})"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def _apply_override(raw: dict[str, Any], assignment: str) -> None:
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment}: expected section.key=value")
    key, value = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment}: empty key")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment}: {part} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read a YAML profile, apply ``section.key=value`` overrides, validate.

    Raises:
        ConfigError: with one line naming the file and the key at fault.
    """
    name = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"{name}: config file not found")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{name}:{where} not valid YAML: {getattr(exc, 'problem', exc)}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{name}: top level must be a mapping of sections")
        raw = loaded
    for item in overrides:
        _apply_override(raw, item)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        src = f"{name} with --set" if overrides else name
        raise ConfigError(f"{src}: {first}{more}") from None
