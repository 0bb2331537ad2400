-- The evaluation table of one split: per-sample losses joined with the manifest and the attributes.
-- $losses, $manifest, $attributes, $attribute_names, $split  as in group_metrics.sql
SELECT
    l.sample_id,
    m.identity,
    m.shard,
    l.label,
    l.loss,
    l.predicted,
    l.correct,
    l.p_true,
    l.true_class_auroc,
    a.* EXCLUDE (sample_id)
FROM read_parquet($losses) AS l
JOIN read_parquet($manifest) AS m USING (sample_id)
JOIN (
    SELECT sample_id, COLUMNS(lambda c: list_contains($attribute_names, c))
    FROM read_parquet($attributes)
) AS a USING (sample_id)
WHERE m.split = $split
ORDER BY l.sample_id
