-- Black-box performance on one split in the four cells of attribute pairs: for pair i,
-- attribute_a = $first[i] and attribute_b = $second[i], one row per (value_a, value_b) present.
-- $losses, $attributes, $split  as in group_metrics.sql
-- $first, $second  VARCHAR[] of equal length (attribute column names)
-- Only the split's samples and the named attributes are unpivoted, so the self-join stays small.
-- An empty cell has no row; the caller fills it in as n = 0.
WITH pairs AS (
    SELECT unnest($first) AS attribute_a, unnest($second) AS attribute_b
),
eval AS (
    SELECT sample_id, loss, correct, true_class_auroc
    FROM read_parquet($losses)
    WHERE split = $split
),
long AS (
    FROM (
        SELECT a.sample_id, COLUMNS(lambda c: list_contains(list_concat($first, $second), c))
        FROM read_parquet($attributes) AS a
        SEMI JOIN eval USING (sample_id)
    )
    UNPIVOT (value FOR attribute IN (COLUMNS(* EXCLUDE (sample_id))))
)
SELECT
    p.attribute_a,
    p.attribute_b,
    a.value AS value_a,
    b.value AS value_b,
    count(*) AS n,
    avg(e.loss) AS mean_loss,
    avg(CAST(e.correct AS DOUBLE)) AS accuracy,
    avg(e.true_class_auroc) AS auroc
FROM pairs AS p
JOIN long AS a ON a.attribute = p.attribute_a
JOIN long AS b ON b.attribute = p.attribute_b AND b.sample_id = a.sample_id
JOIN eval AS e ON e.sample_id = a.sample_id
GROUP BY p.attribute_a, p.attribute_b, a.value, b.value
ORDER BY p.attribute_a, p.attribute_b, a.value DESC, b.value DESC
