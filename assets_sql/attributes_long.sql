-- One row per (sample, attribute): the boolean CelebA columns of attributes.parquet, unpivoted.
-- $attributes       attributes.parquet (sample_id + one BOOLEAN column per attribute)
-- $attribute_names  VARCHAR[]: the attribute columns to unpivot (the 40 CelebA names)
-- NULL labels are kept (INCLUDE NULLS) so that a missing value shows up instead of vanishing.
FROM (
    SELECT sample_id, COLUMNS(lambda c: list_contains($attribute_names, c))
    FROM read_parquet($attributes)
)
UNPIVOT INCLUDE NULLS (value FOR attribute IN (COLUMNS(* EXCLUDE (sample_id))))
