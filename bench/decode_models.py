"""The models ``embscale decode-bench`` compares: a model config, a run folder's trained weights, or a sweep's
matched NE/MoE pair.

- a config (a YAML file, or a shipped config's name such as ``bench_ne_100m``): random weights;
- a run folder (``results/<sweep>/<run_id>``): the model section of its ``run.json`` and the weights of its newest
  intact checkpoint (:func:`embscale.base.rundir.read_latest_checkpoint`, loaded with ``weights_only=True``;
  nothing in the folder is renamed or written);
- a sweep file and a selector: one of the plan's matched pairs (:meth:`embscale.sweeps.expand.Plan.pairs`: an
  embedding-scaled run and its parameter-equivalent MoE), picked by a run id (either member's, or a unique
  prefix) or by ``key=value`` terms on the embedding-scaled run's point (``ratio=8``, ``ratio=8,seed=0``).
  Each member takes its trained weights when its run folder has a checkpoint, else random ones.

Every problem is a :class:`~embscale.base.errors.UserError` (or ``ConfigError``) naming the file or field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embscale.base import rundir
from embscale.base.errors import ConfigError, UserError
from embscale.models.config import CONFIG_DIR, ModelConfig

FAMILY_NAMES = {"ne": "NE", "plne": "PLNE", "ple": "PLE", "moe": "MoE", "dense": "Dense"}


@dataclass
class BenchModel:
    """One model to benchmark: what it is called in tables and figures, its config, and where its weights come
    from (``state`` None: random weights)."""

    label: str
    family: str  # ne | plne | ple | moe | dense
    cfg: ModelConfig
    source: str
    state: dict[str, Any] | None = None
    state_path: Path | None = None
    step: int | None = None

    @property
    def weights(self) -> str:
        if self.state is None:
            return "random"
        return f"checkpoint step {self.step} ({self.state_path})"


def model_family(cfg: ModelConfig) -> str:
    """``ne`` with an N-gram Embedding, else the per-layer kind, else ``moe`` with routed experts, else ``dense``."""
    if cfg.ngram is not None:
        return "ne"
    if cfg.per_layer is not None:
        return cfg.per_layer.kind
    return "moe" if cfg.n_experts > 0 and cfg.top_k > 0 else "dense"


def config_path(name: str) -> Path:
    """A config file path as given, or a shipped config by name (``tiny_moe``, ``tiny_moe.yaml``)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / (name if name.endswith((".yaml", ".yml")) else f"{name}.yaml")
    if path.parent == Path(".") and shipped.exists():
        return shipped
    raise UserError(f"{name}: no such config file or run folder (shipped configs: "
                    f"{', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")


def from_config(name: str) -> BenchModel:
    path = config_path(name)
    cfg = ModelConfig.from_yaml(path)
    return BenchModel(label=path.stem, family=model_family(cfg), cfg=cfg, source=str(path))


def _run_config(run_dir: Path) -> ModelConfig:
    record_path = run_dir / rundir.RUN_FILE
    record, problem = rundir.read_json_checked(record_path)
    if record is None:
        raise UserError(f"{record_path}: {problem or 'missing'} (a run folder needs its run.json)")
    model = record.get("model")
    if model is None and isinstance(record.get("config"), dict):
        model = record["config"].get("model")  # a planned record, not yet started
    if not isinstance(model, dict):
        raise UserError(f"{record_path}: no 'model' section")
    try:
        return ModelConfig.from_dict(model)
    except ConfigError as exc:
        raise exc.under("model").in_file(str(record_path)) from None


def read_checkpoint(run_dir: Path) -> tuple[int, Path, dict[str, Any]] | None:
    """``(step, path, model state)`` of the run's newest intact checkpoint, None when it has no checkpoint at
    all; a UserError naming the files when every checkpoint is unusable or holds no model state."""
    found, unusable = rundir.read_latest_checkpoint(run_dir)
    if found is None:
        if not unusable:
            return None
        raise UserError("no intact checkpoint in " + str(rundir.checkpoint_dir(run_dir)) + ": "
                        + "; ".join(f"{path.name}: {why}" for path, why in unusable))
    step, path, payload = found
    state = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(state, dict):
        raise UserError(f"{path}: not a training checkpoint (no 'model' state)")
    return step, path, state


def from_run_dir(run_dir: Path, label: str | None = None) -> BenchModel:
    run_dir = Path(run_dir)
    cfg = _run_config(run_dir)
    found = read_checkpoint(run_dir)
    if found is None:
        raise UserError(f"{rundir.checkpoint_dir(run_dir)}: no checkpoint to load (benchmark its config instead "
                        "for random weights)")
    step, path, state = found
    return BenchModel(label=label or run_dir.name, family=model_family(cfg), cfg=cfg, source=str(run_dir),
                      state=state, state_path=path, step=step)


def resolve(spec: str) -> BenchModel:
    """A run folder when ``spec`` is one (it holds run.json or status.json), else a config."""
    return from_run_dir(Path(spec)) if rundir.is_run_dir(Path(spec)) else from_config(spec)


def _point_matches(point: dict[str, Any], terms: dict[str, str]) -> bool:
    for key, wanted in terms.items():
        if key not in point:
            return False
        value = point[key]
        try:
            if float(value) != float(wanted):
                return False
        except (TypeError, ValueError):
            if str(value) != wanted:
                return False
    return True


def sweep_pair(sweep_file: str, selector: str | None, results: str | None = None) -> tuple[BenchModel, BenchModel]:
    """The (embedding-scaled, MoE) pair of ``sweep_file`` that ``selector`` picks (see the module docstring)."""
    from embscale.sweeps.plan import load_plan

    if not Path(sweep_file).is_file():
        raise UserError(f"{sweep_file}: no such sweep file")
    loaded = load_plan(sweep_file, results)
    pairs = loaded.plan.pairs()
    if not pairs:
        raise UserError(f"{sweep_file}: the plan has no matched pair with both runs planned")
    if selector is None:
        chosen = pairs
    elif "=" in selector:
        terms = dict(term.split("=", 1) for term in selector.split(",") if "=" in term)
        chosen = [pair for pair in pairs if _point_matches(pair[0].point, {k.strip(): v.strip()
                                                                           for k, v in terms.items()})]
    else:
        chosen = [pair for pair in pairs if any(run.run_id.startswith(selector) for run in pair)]
    if len(chosen) != 1:
        listing = "\n".join(f"  {ne.run_id} ({ne.family}) / {moe.run_id} (moe): {ne.point}" for ne, moe in pairs)
        what = "no pair matches" if not chosen else f"{len(chosen)} pairs match"
        raise UserError(f"--pair {selector}: {what} in {sweep_file}; its pairs (embedding run / MoE run: point):\n"
                        f"{listing}")
    members = []
    for run in chosen[0]:
        cfg = loaded.plan.model_configs.get(run.run_id) or ModelConfig.from_dict(run.config["model"])
        run_dir = loaded.run_dir(run)
        found = read_checkpoint(run_dir) if run_dir.is_dir() else None
        label = f"{FAMILY_NAMES[model_family(cfg)]} {run.run_id[:8]}"
        model = BenchModel(label=label, family=model_family(cfg), cfg=cfg, source=f"{sweep_file}: {run.run_id}")
        if found is not None:
            model.step, model.state_path, model.state = found
        members.append(model)
    return members[0], members[1]


def check_same_vocabulary(models: list[BenchModel]) -> None:
    """Members of a comparison decode the same prompts: their ``vocab_size`` must agree."""
    first = models[0]
    for other in models[1:]:
        if other.cfg.vocab_size != first.cfg.vocab_size:
            raise UserError(f"{other.source}: vocab_size {other.cfg.vocab_size} differs from "
                            f"{first.source}'s {first.cfg.vocab_size} (a pair decodes the same prompts)")


def build(model: BenchModel, device: str, dtype: str, seed: int):
    """The module of ``model`` on ``device`` in ``dtype`` (built in that dtype: a large model never exists in
    float32 first), its checkpoint's weights loaded when it has them; a UserError naming the checkpoint when its
    tensors do not fit the config."""
    import torch

    from embscale.models.model import build_model

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        module = build_model(model.cfg, device=device)
    finally:
        torch.set_default_dtype(previous)
    if model.state is not None:
        try:
            module.load_state_dict(model.state)
        except RuntimeError as exc:
            raise UserError(f"{model.state_path}: its model state does not fit {model.source}'s config: "
                            f"{str(exc).splitlines()[0]} ...") from None
    return module.to(getattr(torch, dtype)).eval()


__all__ = ["BenchModel", "build", "check_same_vocabulary", "config_path", "from_config", "from_run_dir",
           "model_family", "read_checkpoint", "resolve", "sweep_pair"]
