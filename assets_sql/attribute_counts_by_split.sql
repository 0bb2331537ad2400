-- Per attribute and split: number of labelled samples, number positive, and the positive rate.
-- $attributes, $attribute_names as in attributes_long.sql; $manifest  manifest.parquet (splits).
WITH long AS (
    FROM (
        SELECT sample_id, COLUMNS(lambda c: list_contains($attribute_names, c))
        FROM read_parquet($attributes)
    )
    UNPIVOT (value FOR attribute IN (COLUMNS(* EXCLUDE (sample_id))))
)
SELECT
    long.attribute,
    m.split,
    count(*) AS n,
    count(*) FILTER (WHERE long.value) AS n_positive,
    avg(CAST(long.value AS DOUBLE)) AS rate
FROM long
JOIN read_parquet($manifest) AS m USING (sample_id)
GROUP BY long.attribute, m.split
ORDER BY long.attribute, m.split
