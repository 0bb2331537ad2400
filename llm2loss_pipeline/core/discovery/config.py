"""DiscoveryConfig: how candidate descriptions are made, matched to samples and judged."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llm2loss_pipeline.core.attributes import check_split
from llm2loss_pipeline.core.choices import one_of

DEFAULT_API_KEY_ENV = "LLM2LOSS_LLM_API_KEY"
ESTIMATORS = ("grounded", "direct")


class ProposerConfig(BaseModel):
    """An optional language model that proposes more descriptions (off: everything is offline)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(False, description="ask an OpenAI-compatible endpoint for descriptions")
    base_url: str = Field(
        "http://127.0.0.1:8000/v1",
        description="endpoint root; the proposer POSTs to {base_url}/chat/completions",
    )
    model_name: str = Field("gpt-4o-mini", description="model name sent in the request")
    api_key_env: str = Field(
        DEFAULT_API_KEY_ENV,
        description="environment variable holding the API key (unset: no Authorization header)",
    )
    timeout_s: float = Field(30.0, gt=0, le=600, description="seconds to wait for one reply")
    n_proposals: int = Field(20, ge=1, le=200, description="descriptions to ask for")
    temperature: float = Field(0.7, ge=0, le=2)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"base_url must start with http:// or https://, got {value!r}")
        return value.rstrip("/")


class DiscoverySettings(BaseModel):
    """Every discovery setting but the proposer: flat, so that a Dagster resource can hold it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    eval_split: str = Field("test", description="split whose samples verify each hypothesis")
    vocabulary: list[str] = Field(
        default_factory=list, description="extra descriptions to test, verbatim"
    )
    vocabulary_path: str | None = Field(
        None, description="a text file of extra descriptions, one per line ('#' comments)"
    )
    negations: bool = Field(
        False,
        description="also compose values worded as an absence ('without a goatee'); off because "
        "CLIP-style text towers ignore negation and retrieve the very samples excluded",
    )
    max_arity: int = Field(2, ge=1, le=3, description="attributes per composed description")
    beam: int = Field(
        12, ge=1, le=80, description="best single descriptions that pairs and triples start from"
    )
    max_candidates: int = Field(2000, ge=1, le=100_000)
    by_class: bool = Field(
        True,
        description="for an attribute task, also test each single description within each "
        "class of the task's labels ('face of a man, among images labelled Blond_Hair'): "
        "matched, estimated and verified on that class's images (candidates.class_candidates)",
    )
    match_fraction: float = Field(
        0.1, gt=0, lt=1, description="share of the split matched to a description (top-k)"
    )
    min_matches: int = Field(10, ge=3, description="at least this many matched samples")
    alpha: float = Field(0.05, gt=0, lt=1, description="Benjamini-Hochberg false discovery rate")
    simple_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of the false discovery rate's budget spent on the simplest "
        "descriptions (free text and one attribute value; weighted Benjamini-Hochberg), at "
        "least their share of the candidates; the pairs and triples share the rest",
    )
    estimator: str = Field(
        "grounded",
        description="the heads' estimate a description must agree with: grounded (what "
        "`compare` answers by default, with its calibrated P(worse); direct where the home has "
        "no report) or direct (the heads at the text embedding, P(worse) the members' share); "
        "core/discovery/estimate.py",
    )
    min_p_worse: float = Field(
        0.55,
        gt=0.5,
        le=1,
        description="compare's calibrated P(worse) (the grounded estimate, text error included) "
        "a description must reach to be kept: the estimate leans worse. Chosen on the tuning "
        "worlds 1001-1008 among 0.55, 0.65, 0.75 and 0.9 (bench/RESULTS.md, \"Discovery's gates "
        'against population truth"): the text error keeps these P under 0.8, and 0.75 lost the '
        "planted attributes 0.55 finds",
    )
    min_member_share: float = Field(
        0.75,
        gt=0.5,
        le=1,
        description="with the direct estimate (estimator: direct, or no report): the share of "
        "members that must estimate 'worse'",
    )
    identity_clustered: bool = Field(
        True,
        description="test matched against unmatched samples with each identity's images as one "
        "cluster (a rank test with a cluster-robust error; core/discovery/verify.py), so that a "
        "few hard identities cannot carry a description; false: Mann-Whitney over images",
    )
    labels_alone: bool = Field(
        True,
        description="where attribute labels exist, also keep a description whose images show "
        "its words (wording 'supported') and whose named people are worse at the family-wise "
        "level alpha / candidates, though its matched samples are not measurably worse "
        "(core/discovery/hypotheses.py); false: matched samples must be worse",
    )
    max_overlap: float = Field(
        0.5,
        gt=0,
        le=1,
        description="Jaccard overlap of matched samples at or above which two kept descriptions "
        "are one failure mode, shown under its best wording (0.5: they share two thirds of "
        "their matched samples; two unrelated top-10% matches overlap about 0.05)",
    )
    avoid_subjective: bool = Field(
        True,
        description="word attributes that rate looks or bodies (Attractive, Chubby, Big_Nose, "
        "...) neutrally in composed descriptions, leaving out those with no neutral words "
        "(candidates.NEUTRAL_WORDING); false: the report's canonical words",
    )
    offdomain_min_share: float = Field(
        0.6,
        gt=0,
        lt=1,
        description="a free text whose direction the attribute probes span less of than this "
        "share is off-domain and never kept (core/discovery/modes.py, probe_share)",
    )
    min_lift: float = Field(
        1.5,
        gt=1,
        le=20,
        description="lift over its base rate at which a matched set shows a named attribute",
    )
    n_evidence: int = Field(8, ge=1, le=64, description="proponents and counter-examples each")
    n_sheets: int = Field(5, ge=0, le=50, description="kept hypotheses that get a contact sheet")
    ranker_partners: int = Field(
        256, ge=8, le=100_000, description="reference samples for a ranker's pairwise residual"
    )
    damping: float = Field(
        1e-3, gt=0, le=1, description="ridge added to the linear heads' Hessian (x mean eigenvalue)"
    )

    @field_validator("eval_split")
    @classmethod
    def _split(cls, value: str) -> str:
        return check_split("eval_split", value)

    @field_validator("estimator")
    @classmethod
    def _estimator(cls, value: str) -> str:
        return one_of("estimator", value, ESTIMATORS)

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary(cls, value: list[str]) -> list[str]:
        for position, text in enumerate(value):
            if not text.strip():
                raise ValueError(f"vocabulary entry {position + 1} is empty")
        return value


class DiscoveryConfig(DiscoverySettings):
    """Automatic failure discovery: candidate texts scored by the heads, verified on samples."""

    proposer: ProposerConfig = ProposerConfig()
