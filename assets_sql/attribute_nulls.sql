-- Attribute labels that are NULL: how many, and the first (sample_id, attribute) to name in an error.
-- $attributes, $attribute_names as in attributes_long.sql.
WITH long AS (
    FROM (
        SELECT sample_id, COLUMNS(lambda c: list_contains($attribute_names, c))
        FROM read_parquet($attributes)
    )
    UNPIVOT INCLUDE NULLS (value FOR attribute IN (COLUMNS(* EXCLUDE (sample_id))))
)
SELECT
    count(*) AS n_null,
    min(sample_id) AS first_sample_id,
    arg_min(attribute, sample_id) AS first_attribute
FROM long
WHERE value IS NULL
