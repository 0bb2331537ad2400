-- Image embeddings of one split with the attribute labels of the same samples, in sample order:
-- the inputs of the encoder's zero-shot attribute classification.
-- $embeddings  embedding shards (glob); $manifest; $attributes, $attribute_names; $split
SELECT
    e.sample_id,
    e.embedding,
    a.* EXCLUDE (sample_id)
FROM read_parquet($embeddings) AS e
JOIN read_parquet($manifest) AS m USING (sample_id)
JOIN (
    SELECT sample_id, COLUMNS(lambda c: list_contains($attribute_names, c))
    FROM read_parquet($attributes)
) AS a USING (sample_id)
WHERE m.split = $split
ORDER BY e.sample_id
