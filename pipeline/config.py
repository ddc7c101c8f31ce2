"""Run configuration: YAML profiles validated into typed objects.

Each stage declares its own section class (a :class:`stages.base.StageConfig` subclass) next
to its code; this module composes them into :class:`RunConfig`, applies ``--set`` overrides
and turns any validation failure into one line that names the file and the dotted key::

    configs/local.yaml: transcribe.batch_size: must be >= 1 (got 0)

The resolved config is written to ``OUT/config.yaml`` so a run can be reproduced exactly.

Secrets (a Hugging Face token, say) never come from a config: a config is copied into
``OUT/config.yaml``, shared with the dataset and pasted into bug reports. Backends read them
from the environment (``HF_TOKEN``) when they start, and a profile or ``--set`` that still
gives one (a key of :data:`SECRET_KEYS` with a value) is refused with one line that says
which variable to export instead, without repeating the value.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic_core import PydanticCustomError

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


#: Keys, in any section, that would hold a credential, and the environment variable to
#: export instead (None: the backend's own variable).
SECRET_KEYS: dict[str, str | None] = {
    "hf_token": "HF_TOKEN",
    "use_auth_token": "HF_TOKEN",
    "token": "HF_TOKEN",
    "auth_token": None,
    "api_key": None,
    "password": None,
    "secret": None,
}


def _secrets_in(raw: Any, prefix: str = "") -> Iterator[str]:
    """Dotted keys of ``raw`` that give a value to a :data:`SECRET_KEYS` key."""
    if not isinstance(raw, dict):
        return
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key in SECRET_KEYS and value not in (None, ""):
            yield dotted
        elif isinstance(value, dict):
            yield from _secrets_in(value, f"{dotted}.")


def _secret_message(dotted: str) -> str:
    env = SECRET_KEYS[dotted.rsplit(".", 1)[-1]]
    how = f"export {env}=... instead" if env else "set it in the environment variable its backend reads instead"
    return (
        f"{dotted}: secrets are not read from config files (the config is copied into OUT/config.yaml): "
        f"remove the key and {how}"
    )


def without_secrets(dump: Any) -> Any:
    """``dump`` (a ``model_dump``) without any :data:`SECRET_KEYS` key, at any depth."""
    if isinstance(dump, dict):
        return {k: without_secrets(v) for k, v in dump.items() if k not in SECRET_KEYS}
    if isinstance(dump, list):
        return [without_secrets(v) for v in dump]
    return dump


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
    recordings_per_batch: int = Field(
        0, ge=0, le=1024,
        description="Recordings per call of a per-segment stage (transcribe, tokenize, quality, ...). The "
        "stage's own batch_size then caps segments per model call, cut between whole recordings. Each "
        "recording holds its audio once, so this bounds a worker's memory: a few long recordings, or more "
        "short ones. 0 = sized to the cluster (pipeline.run.batch_recordings): 1 where Ray sees no GPU, "
        "since CPU stages gain nothing from larger calls and one recording per call lets the next stage "
        "start sooner and leaves it a shorter tail; 2 with GPUs. Outputs never depend on it.",
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

    # Inputs are left out of str(ValidationError) so that a refused secret is never echoed.
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), hide_input_in_errors=True)

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

    @model_validator(mode="before")
    @classmethod
    def _no_literal_secrets(cls, data: Any) -> Any:
        """Refuse a credential given as a value (see the module docstring)."""
        for dotted in _secrets_in(data):
            raise PydanticCustomError("literal_secret", _secret_message(dotted))
        return data

    @model_validator(mode="after")
    def _quality_measures_the_filtered_stream(self) -> RunConfig:
        """quality.audio_field follows filter.stream unless set: one setting says which stream is judged."""
        if self.quality.audio_field is None:
            self.quality.audio_field = "audio_enhanced" if self.filter.stream == "enhanced" else "audio"
        return self

    def config_hash(self) -> str:
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def to_yaml(self) -> str:
        """The resolved config as YAML, as written to ``OUT/config.yaml``; never a secret key."""
        return yaml.safe_dump(without_secrets(self.model_dump(mode="json")), sort_keys=False)


def _known_keys(loc: tuple[Any, ...]) -> list[str]:
    """The keys allowed beside ``loc[-1]``: the fields of the section that holds it."""
    model: Any = RunConfig
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        model = getattr(field, "annotation", None)
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
    return sorted(getattr(model, "model_fields", {}))


def _unknown_key_hint(loc: tuple[Any, ...]) -> str:
    """``did you mean ...`` for a misspelt key, else the section's keys: the fix is in the message."""
    import difflib

    known = _known_keys(loc)
    if not known:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), known, n=1)
    if close:
        return f" (did you mean {'.'.join([*map(str, loc[:-1]), close[0]])}?)"
    where = ".".join(map(str, loc[:-1])) or "the top level"
    return f" (keys of {where}: {', '.join(known)})"


def _describe(err: dict[str, Any]) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    kind = err["type"]
    if kind == "literal_secret":  # the message names the key; the input holds the secret
        return str(err["msg"])
    if kind == "extra_forbidden":
        return f"{loc}: unknown key{_unknown_key_hint(tuple(err['loc']))}"
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
            raise ConfigError(f"{name}: config file not found (pass --config with a YAML profile, e.g. configs/local.yaml)")
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
    for dotted in _secrets_in(raw):
        raise ConfigError(f"{name}{' with --set' if overrides else ''}: {_secret_message(dotted)}")
    raw = without_secrets(raw)  # an empty one (``hf_token: null`` in an older OUT/config.yaml) says nothing
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        src = f"{name} with --set" if overrides else name
        raise ConfigError(f"{src}: {first}{more}") from None
