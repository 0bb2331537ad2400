-- The $k attribute pairs whose positives co-occur most often among the samples of one split
-- (ties broken by name, so the choice is deterministic). attribute_a < attribute_b by name.
-- $attributes, $attribute_names  as in attributes_long.sql; $manifest  splits; $split; $k
WITH split_samples AS (
    SELECT sample_id FROM read_parquet($manifest) WHERE split = $split
),
long AS (
    FROM (
        SELECT a.sample_id, COLUMNS(lambda c: list_contains($attribute_names, c))
        FROM read_parquet($attributes) AS a
        SEMI JOIN split_samples USING (sample_id)
    )
    UNPIVOT (value FOR attribute IN (COLUMNS(* EXCLUDE (sample_id))))
),
positives AS (
    SELECT sample_id, attribute FROM long WHERE value
)
SELECT
    a.attribute AS attribute_a,
    b.attribute AS attribute_b,
    count(*) AS n_both
FROM positives AS a
JOIN positives AS b ON a.sample_id = b.sample_id AND a.attribute < b.attribute
GROUP BY a.attribute, b.attribute
ORDER BY n_both DESC, attribute_a, attribute_b
LIMIT $k
