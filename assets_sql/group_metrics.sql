-- Black-box performance on one split, per attribute and attribute value (true / false):
-- group size, mean cross-entropy loss (and its sample variance), accuracy, and AUROC, where the
-- AUROC of a group is the mean over its samples of true_class_auroc (the one-vs-rest ranking
-- AUROC of the sample's true identity among all identity logits).
-- $losses  loss shards (glob); $attributes, $attribute_names  as in attributes_long.sql;
-- $split   the evaluation split, matched against the loss table's split column
-- A group with no samples has no row; the caller fills it in as n = 0.
WITH eval AS (
    SELECT sample_id, loss, correct, true_class_auroc
    FROM read_parquet($losses)
    WHERE split = $split
),
long AS (
    FROM (
        SELECT sample_id, COLUMNS(lambda c: list_contains($attribute_names, c))
        FROM read_parquet($attributes)
    )
    UNPIVOT (value FOR attribute IN (COLUMNS(* EXCLUDE (sample_id))))
)
SELECT
    long.attribute,
    long.value,
    count(*) AS n,
    avg(eval.loss) AS mean_loss,
    var_samp(eval.loss) AS loss_variance,
    avg(CAST(eval.correct AS DOUBLE)) AS accuracy,
    avg(eval.true_class_auroc) AS auroc
FROM eval
JOIN long USING (sample_id)
GROUP BY long.attribute, long.value
ORDER BY long.attribute, long.value
