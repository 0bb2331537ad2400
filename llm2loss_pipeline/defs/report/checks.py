"""Asset checks on the report and the heads: things a reader must be able to trust."""

from collections.abc import Iterator

import dagster as dg

from llm2loss_pipeline.core.steps import report as steps
from llm2loss_pipeline.defs.diagnosis.assets import diagnosis_heads
from llm2loss_pipeline.defs.report.assets import attribute_disparity_report
from llm2loss_pipeline.defs.resources import ReportResource, StorageResource


@dg.asset_check(
    asset=attribute_disparity_report,
    description="The report has one row per diagnosed attribute of the dataset (CelebA: 40) "
    "and only finite numbers.",
)
def report_is_complete(storage: StorageResource) -> dg.AssetCheckResult:
    outcome = steps.check_complete(storage.layout())
    return _result(outcome)


@dg.asset_check(
    asset=attribute_disparity_report,
    description=(
        "Every attribute group is large enough for an AUROC; smaller ones are marked "
        "small_group in the report, never dropped."
    ),
)
def report_group_sizes(storage: StorageResource, report: ReportResource) -> dg.AssetCheckResult:
    outcome = steps.check_group_sizes(storage.layout(), report.spec().min_group_size)
    return _warning(outcome)


@dg.asset_check(
    asset=diagnosis_heads,
    description="Held-out Spearman of the heads' ensemble is above report.head_spearman_floor.",
)
def heads_validation_floor(
    storage: StorageResource, report: ReportResource
) -> Iterator[dg.AssetCheckResult]:
    outcome = steps.check_heads_floor(storage.layout(), report.spec().head_spearman_floor)
    yield _warning(outcome)


@dg.asset_check(
    asset=attribute_disparity_report,
    description=(
        "Trust check: of the attributes claimed worse or better, the share whose measured gap "
        "agrees (each judged without its own label) is at least report.trust_floor."
    ),
)
def report_trust(storage: StorageResource, report: ReportResource) -> dg.AssetCheckResult:
    outcome = steps.check_trust(storage.layout(), report.spec().trust_floor)
    return _warning(outcome)


def _result(
    outcome: steps.CheckOutcome, severity: dg.AssetCheckSeverity = dg.AssetCheckSeverity.ERROR
) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=outcome.passed,
        severity=severity,
        metadata=outcome.metadata,
        description=outcome.message,
    )


def _warning(outcome: steps.CheckOutcome) -> dg.AssetCheckResult:
    """A check whose failure warns: the report stays usable, and says what to distrust."""
    return _result(outcome, dg.AssetCheckSeverity.WARN)
